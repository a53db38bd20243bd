"""Per-round checkpoints: everything a killed ServerApp needs to continue its run.

After round 0 (the zero-shot evaluation) and after every round, ``<run>/checkpoint/``
gets:

- ``round-<r>.safetensors``: the global adapters (``arrays.*``), the task's shared state
  (``task.*``, the prototype bank), the router (``router.*``), its Adam moments and step
  counts (``router_opt.*``) and torch's RNG state (``rng.torch``);
- ``latest.json``, the commit point, replaced atomically *after* the tensors are on disk:
  the round, the resolved run config, the client-state key, the number of clients, the
  tensor file's name and SHA-256, the adapters' key order, the optimiser's param groups,
  the minimax distribution, the strategy history, the metrics rows so far, and the Python
  and numpy RNG states.

A kill at any moment leaves ``latest.json`` naming either the previous complete round or
the new one, never a mix. Nothing is unpickled: tensors go through safetensors, all else
through JSON (whose floats round-trip exactly).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rcsr_flower.routing.errors import ConfigError
from rcsr_flower.routing.outputs import durable_replace, resolve_output_path

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord

# torch, numpy, safetensors and Flower are imported where tensors are read or written:
# an experiment runner asks every cell's latest.json (read_latest) whether it can resume,
# and importing torch for that held 0.15 GB in the runner for the whole suite

FORMAT = 1
CHECKPOINT_DIR = "checkpoint"
LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint on disk is unreadable or inconsistent."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the state after round ``round``."""

    round: int
    config: dict[str, Any]
    state_key: str
    num_clients: int
    arrays: ArrayRecord
    strategy_tensors: dict[str, torch.Tensor]
    strategy_meta: dict
    rows: list[dict]
    rng: dict

    @property
    def num_rounds(self) -> int:
        return int(self.config["num-server-rounds"])

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {k[5:]: v for k, v in self.strategy_tensors.items() if k.startswith("task.")}


# ---------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict, torch.Tensor]:
    """Python, numpy and torch global RNG states as JSON + one uint8 tensor."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return state, torch.get_rng_state()


def restore_rng(ckpt: Checkpoint) -> None:
    """Put the global RNGs where they were when the checkpoint was taken."""
    import numpy as np
    import torch

    version, internal, gauss = ckpt.rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = ckpt.rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(ckpt.rng["torch"])


# ---------------------------------------------------------------------------- write
def save_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: ArrayRecord,
    strategy_state: tuple[dict[str, torch.Tensor], dict],
    rows: list[dict],
    *,
    config: dict[str, Any],
    state_key: str,
    num_clients: int,
) -> Path:
    """Write the state after ``server_round``; returns the checkpoint directory."""
    from safetensors.torch import save_file

    ckpt_dir = run_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    strategy_tensors, strategy_meta = strategy_state
    adapters = arrays.to_torch_state_dict()
    rng, torch_rng = capture_rng()
    tensors = {
        **{f"arrays.{k}": v for k, v in adapters.items()},
        **strategy_tensors,
        "rng.torch": torch_rng,
    }
    name = f"round-{server_round:05d}.safetensors"
    tmp = ckpt_dir / (name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    durable_replace(tmp, ckpt_dir / name)
    latest = {
        "format": FORMAT,
        "round": server_round,
        "tensors": name,
        "sha256": hashlib.sha256((ckpt_dir / name).read_bytes()).hexdigest(),
        "state_key": state_key,
        "num_clients": num_clients,
        "config": config,
        "arrays_order": list(adapters),
        "strategy": strategy_meta,
        "rng": rng,
        "rows": rows,
    }
    tmp = ckpt_dir / (LATEST + ".tmp")
    tmp.write_text(json.dumps(latest))
    durable_replace(tmp, ckpt_dir / LATEST)
    for old in ckpt_dir.glob("round-*.safetensors*"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return ckpt_dir


# ---------------------------------------------------------------------------- read
def read_latest(run_dir: Path) -> dict | None:
    """``latest.json`` of ``run_dir`` (no tensors), or None when there is none."""
    path = run_dir / CHECKPOINT_DIR / LATEST
    if not path.is_file():
        return None
    try:
        latest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if latest.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has format {latest.get('format')!r}; this version reads {FORMAT}"
        )
    return latest


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint of ``run_dir``, verified; None when there is none."""
    from flwr.app import ArrayRecord
    from safetensors.torch import load_file

    latest = read_latest(run_dir)
    if latest is None:
        return None
    path = run_dir / CHECKPOINT_DIR / latest["tensors"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (named by {LATEST})")
    if hashlib.sha256(path.read_bytes()).hexdigest() != latest["sha256"]:
        raise CheckpointError(f"{path} does not match the SHA-256 in {LATEST}")
    tensors = load_file(str(path))
    adapters = ArrayRecord(
        {k: tensors.pop(f"arrays.{k}").contiguous() for k in latest["arrays_order"]}
    )
    rng = {**latest["rng"], "torch": tensors.pop("rng.torch")}
    return Checkpoint(
        round=int(latest["round"]),
        config=latest["config"],
        state_key=str(latest["state_key"]),
        num_clients=int(latest["num_clients"]),
        arrays=adapters,
        strategy_tensors=tensors,
        strategy_meta=latest["strategy"],
        rows=latest["rows"],
        rng=rng,
    )


# a run-config key every routed run may change on resume: where its outputs go
ALWAYS_MAY_CHANGE = frozenset({"resume-from", "run-name", "output-dir"})


def resume_point(
    config: Mapping[str, Any], out: Path, may_change: Iterable[str] = ()
) -> Checkpoint | None:
    """The checkpoint a run with ``config`` (kebab-case run config, ``num-server-rounds``
    and optionally ``resume-from`` and ``run-name`` in it) continues from, or None for a
    fresh run writing to ``out``.

    Raises ``ConfigError`` (one line) when ``resume-from`` holds no checkpoint, a finished
    run, or a run whose config differs in keys outside ``may_change`` (plus
    ``ALWAYS_MAY_CHANGE``); and when a fresh run would overwrite an unfinished one in
    ``out``.
    """
    may_change = ALWAYS_MAY_CHANGE | frozenset(may_change)
    resume_from = str(config.get("resume-from", "") or "")
    if not resume_from:
        latest = read_latest(out)
        if latest is not None and latest["round"] < int(latest["config"]["num-server-rounds"]):
            raise ConfigError(
                f"run-config 'run-name' = {str(config.get('run-name', ''))!r}: {out} "
                f"holds an unfinished run (checkpoint after round {latest['round']} of "
                f"{latest['config']['num-server-rounds']}); continue it with "
                f'resume-from="{out}" or choose another run-name'
            )
        return None
    source = resolve_output_path(resume_from)
    ckpt = load_checkpoint(source)
    if ckpt is None:
        raise ConfigError(
            f"run-config 'resume-from' = {resume_from!r}: no checkpoint in {source} "
            f"({CHECKPOINT_DIR}/{LATEST}); allowed is the output directory of an unfinished run"
        )
    now = dict(config)
    differ = sorted(
        k
        for k in set(now) | set(ckpt.config)
        if k not in may_change and now.get(k, "<absent>") != ckpt.config.get(k, "<absent>")
    )
    if differ:
        detail = ", ".join(
            f"'{k}' (checkpoint {ckpt.config.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r})"
            for k in differ
        )
        raise ConfigError(
            f"run-config 'resume-from' = {resume_from!r}: the run config differs from the "
            f"checkpoint's in {detail}; only {', '.join(sorted(may_change))} may change"
        )
    if ckpt.round >= ckpt.num_rounds:
        raise ConfigError(
            f"run-config 'resume-from' = {resume_from!r}: that run already finished all "
            f"{ckpt.num_rounds} rounds; nothing to resume (start a new run instead)"
        )
    return ckpt
