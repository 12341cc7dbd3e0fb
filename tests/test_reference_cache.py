"""The centralized reference cache: trained once per key, refused when unreadable, never shared across keys."""

from __future__ import annotations

import numpy as np

from fed_app.reference_cache import TRAINED, cached_reference, reference_key


def test_trained_once_then_read_and_keys_differ(tmp_path):
    x, q = np.ones((5, 4), np.float32), np.zeros((2, 4), np.float32)
    calls = []

    def compute():
        calls.append(1)
        return {"recall_10_at_10": 0.5, "distortion": 1.25}

    key = reference_key({"kind": "pq", "m": 2}, (x, q), 10, 0)
    first = cached_reference(tmp_path, key, compute)
    second = cached_reference(tmp_path, key, compute)
    assert len(calls) == 1 and first["source"] == TRAINED and second["source"].startswith(f"cache {tmp_path}")
    assert {k: v for k, v in second.items() if k != "source"} == {"recall_10_at_10": 0.5, "distortion": 1.25}
    others = {reference_key({"kind": "pq", "m": 2}, (x, q), 10, 1), reference_key({"kind": "pq", "m": 4}, (x, q), 10, 0),
              reference_key({"kind": "pq", "m": 2}, (x + 1, q), 10, 0), reference_key({"kind": "pq", "m": 2}, (x, q), 20, 0),
              reference_key({"kind": "pq", "m": 2}, (x, q), 10, 0, code="changed")}
    assert key not in others and len(others) == 5


def test_unreadable_entry_is_retrained_and_no_cache_always_trains(tmp_path):
    key = "k" * 32
    (tmp_path / f"{key}.json").write_text('{"recall_10_at_10": NaN}')
    out = cached_reference(tmp_path, key, lambda: {"recall_10_at_10": 0.25})
    assert out == {"recall_10_at_10": 0.25, "source": TRAINED}
    assert cached_reference(tmp_path, key, lambda: {"recall_10_at_10": 0.0})["recall_10_at_10"] == 0.25
    assert cached_reference(None, key, lambda: {"recall_10_at_10": 0.75}) == {"recall_10_at_10": 0.75, "source": TRAINED}
