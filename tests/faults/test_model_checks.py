"""A model is refused before anyone uses it: a near-singular or exploding encoder, a
"rotation" that is not orthogonal, a centroid far beyond the data, wrong shapes. The
client refuses it (by name, as a refusal reply) for training, evaluation and deploy."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fed_app.client_app import make_client_app
from fed_app.config import compose_config, load_experiment
from fed_app.encoder import initial_weights
from fed_app.federation import public_init
from fed_app.local_data import load_dataset
from fed_app.model_guard import check_model, max_norm
from fed_app.privacy.policy import ClientPolicy
from fed_app.secure_statistics import rotation_weights
from fed_app.settings import client_config
from fed_app.state import GlobalState, record_of
from vector_index.model_checks import ModelBounds, check_codebook_norms, check_encoder
from vector_index.validation import VectorError

BOUNDS = ModelBounds(max_gain=100.0, orthogonal_tol=1e-3, norm_slack=4.0)


def test_a_sound_encoder_passes_and_a_singular_or_exploding_one_does_not():
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    check_encoder(rotation, np.zeros(8), BOUNDS, rotation=True)
    check_encoder(np.diag(np.linspace(0.5, 3, 8)), np.ones(8), BOUNDS, rotation=False)
    singular = np.eye(8)
    singular[3] = 0.0
    with pytest.raises(VectorError, match=r"singular values span \[0, 1\]"):
        check_encoder(singular, np.zeros(8), BOUNDS, rotation=False)
    with pytest.raises(VectorError, match="singular values span"):
        check_encoder(np.eye(8) * 1e6, np.zeros(8), BOUNDS, rotation=False)
    with pytest.raises(VectorError, match="NaN or infinite"):
        check_encoder(np.full((8, 8), np.nan), np.zeros(8), BOUNDS, rotation=False)
    with pytest.raises(VectorError, match=r"a rotation must be orthogonal.*R R\^T - I"):
        check_encoder(np.diag(np.linspace(0.9, 1.1, 8)), np.zeros(8), BOUNDS, rotation=True)


def test_a_centroid_far_beyond_the_data_is_refused():
    books = {"pq": np.random.default_rng(0).normal(size=(4, 16, 2)).astype(np.float32) * 0.3}
    check_codebook_norms(books, 1.0, BOUNDS)
    books["pq"][2, 5] = 1e38
    with pytest.raises(VectorError, match=r"codebook level 'pq': a centroid of norm 1\.41e\+38 exceeds 4"):
        check_codebook_norms(books, 1.0, BOUNDS)
    books["pq"][2, 5] = np.inf
    with pytest.raises(VectorError, match="NaN or infinite"):
        check_codebook_norms(books, 1.0, BOUNDS)


@pytest.fixture(scope="module")
def tiny():
    from conftest import TINY

    cfg = load_experiment(compose_config([*TINY, "privacy=trusted", "model=affine", "eval.protocol=private"]))
    data = load_dataset(cfg.data)
    state = GlobalState(encoder=initial_weights(data.base.shape[1], "affine"))
    public_init(state, cfg.index.spec, cfg, data)
    return cfg, data, state


def test_the_global_model_check_names_shape_and_level_faults(tiny):
    cfg, data, state = tiny
    spec, d, norm = cfg.index.spec, data.base.shape[1], max_norm(data.base)
    check_model(state, spec, d, norm, BOUNDS)
    bad = GlobalState(encoder=state.encoder, codebooks={"pq": state.codebooks["pq"][:, :10]})
    with pytest.raises(VectorError, match=r"codebook level 'pq': shape \(4, 10, 4\), expected \(4, 64, 4\)"):
        check_model(bad, spec, d, norm, BOUNDS)
    with pytest.raises(VectorError, match=r"codebook level 'coarse': a pq index has levels \['pq'\]"):
        check_model(GlobalState(encoder=state.encoder, codebooks={**state.codebooks, "coarse": state.codebooks["pq"]}), spec, d, norm, BOUNDS)
    with pytest.raises(VectorError, match="encoder: its weights do not load"):
        check_model(GlobalState(encoder={"linear.weight": np.eye(d, dtype=np.float32)}, codebooks={}), spec, d, norm, BOUNDS)
    rotated = GlobalState(encoder=rotation_weights(initial_weights(d, "rotation"), np.eye(d, dtype=np.float32)), codebooks=state.codebooks)
    check_model(rotated, spec, d, norm, BOUNDS)


def _message(cfg, state: GlobalState, message_type: str, shard_root) -> Message:
    md = Metadata(run_id=1, message_id=f"m-{time.monotonic_ns()}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    config = client_config(cfg)
    config["server-round"] = 1
    config["deploy.model-version"] = 1
    config["deploy.shard-root"] = str(shard_root)
    enc = record_of({"encoder." + k: v for k, v in state.encoder.items()})
    books = record_of({"codebook." + k: v for k, v in state.codebooks.items()})
    return Message(content=RecordDict({"arrays": enc, "codebooks": books, "config": config}), metadata=md)


@pytest.mark.parametrize("message_type", ["train", "evaluate", "train.deploy"])
@pytest.mark.parametrize("fault, match", [
    ("singular", r"encoder: singular values span \[0, 1\]"),
    ("huge-codebook", r"codebook level 'pq': a centroid of norm .* exceeds"),
    ("nan-encoder", r"encoder: the transform holds NaN"),
])
def test_a_client_refuses_a_bad_model_by_name_and_keeps_its_shard(tiny, tmp_path, message_type, fault, match):
    cfg, data, state = tiny
    enc = {k: v.copy() for k, v in state.encoder.items()}
    books = {k: v.copy() for k, v in state.codebooks.items()}
    if fault == "singular":
        enc["linear.weight"][2] = 0.0
    elif fault == "huge-codebook":
        books["pq"][1, 3] = 1e38
    else:
        enc["linear.bias"][0] = np.nan
    app = make_client_app(ClientPolicy.for_simulation(cfg))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": cfg.num_clients}, state=RecordDict(), run_config={})
    reply = app(_message(cfg, GlobalState(encoder=enc, codebooks=books), message_type, tmp_path / "shards"), context)
    assert "refusal" in reply.content.config_records, reply.content
    assert reply.content["refusal"]["limit"] == "model"
    assert "the model the server sent is refused" in reply.content["refusal"]["reason"]
    assert re.search(match, reply.content["refusal"]["reason"]), reply.content["refusal"]["reason"]
    assert f"{max_norm(data.base):.3g}" not in reply.content["refusal"]["reason"]  # only a power of 2 of the data's norm
    assert not (tmp_path / "shards").exists()  # nothing was written with it
    good = app(_message(cfg, state, message_type, tmp_path / "shards"), context)  # the sound model is still answered
    assert "refusal" not in good.content.config_records, good.content
