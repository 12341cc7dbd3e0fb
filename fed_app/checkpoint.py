"""The server's checkpoint after every round, and resuming from it.

``checkpoint.npz`` holds the global model and the server optimiser's moments (FedAdam /
FedYogi); ``checkpoint.json`` the round, the config and every log the summary is built
from, with the npz's SHA-256. Both are written to a temporary name and renamed (the json
last), so a SIGKILL at any instant leaves the previous checkpoint or the new one, never
a mix. ``resume=<run dir>`` starts a new run (in its own fresh directory) from there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .summary import json_safe

MODEL_FILE, STATE_FILE = "checkpoint.npz", "checkpoint.json"
MOMENTS = ("m_t", "v_t")  # Flower's FedOpt state that carries across rounds
NOT_COMPARED = ("resume",)  # config keys a resumed run may change


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass
class Checkpoint:
    round: int
    config: dict[str, Any]
    model: dict[str, np.ndarray]
    moments: dict[str, dict[str, np.ndarray]]
    logs: dict[str, Any]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(out_dir: Path, server_round: int, config: dict[str, Any], model: dict[str, np.ndarray],
         moments: dict[str, dict[str, np.ndarray]], logs: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{k}": v for k, v in model.items()}
    arrays.update({f"{name}/{k}": v for name, d in moments.items() for k, v in d.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    _atomic_write(out_dir / MODEL_FILE, data)
    state = {"round": server_round, "config": config, "logs": logs, "model_sha256": hashlib.sha256(data).hexdigest()}
    _atomic_write(out_dir / STATE_FILE, json.dumps(json_safe(state), default=str, allow_nan=False).encode())


def load(run_dir: Path, config: dict[str, Any]) -> Checkpoint:
    """The checkpoint in ``run_dir``, refused unless it belongs to this experiment."""
    state_path, model_path = run_dir / STATE_FILE, run_dir / MODEL_FILE
    if not state_path.is_file() or not model_path.is_file():
        raise CheckpointError(f"resume={run_dir}: no {STATE_FILE} / {MODEL_FILE} there (a run checkpoints after every round)")
    try:
        state = json.loads(state_path.read_text())
        data = model_path.read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume={run_dir}: unreadable checkpoint ({e})") from None
    if hashlib.sha256(data).hexdigest() != state.get("model_sha256"):
        raise CheckpointError(f"resume={run_dir}: {MODEL_FILE} does not match {STATE_FILE} (modified or from another round)")
    theirs = {k: v for k, v in state["config"].items() if k not in NOT_COMPARED}
    ours = json.loads(json.dumps(json_safe({k: v for k, v in config.items() if k not in NOT_COMPARED}), default=str))
    if theirs != ours:
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise CheckpointError(f"resume={run_dir}: the checkpoint is of another experiment (config differs in {differ}); "
                              "resume with the same overrides as the interrupted run")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    model = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("model/")}
    moments = {name: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}/")} for name in MOMENTS}
    return Checkpoint(int(state["round"]), state["config"], model, {k: v for k, v in moments.items() if v}, state["logs"])
