"""Per-round checkpoints on real files: bit-exact restore, atomic commit, resume checks."""

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from test_strategy import rcsr, reply, stats, task_identity, theta  # noqa: F401

from rcsr_flower.config import ConfigError, RunConfig
from rcsr_flower.routing import checkpoint
from rcsr_flower.routing.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)

KEY = "0123456789abcdef" * 2


def replies(server_round: int):
    s = 10 * server_round
    return [
        reply(1, theta(s + 1), 10, 0.5 + server_round, stats(s + 1)),
        reply(2, theta(s + 2), 20, 2.0, stats(s + 2, (1.0, 0.0))),
        reply(3, theta(s + 3), 5, 1.0, stats(s + 3, (0.0, 1.0))),
    ]


def play(strategy, arrays: ArrayRecord, rounds) -> ArrayRecord:
    for r in rounds:
        strategy.current = arrays
        arrays, _ = strategy.aggregate_train(r, replies(r))
    return arrays


def snapshot(strategy, arrays: ArrayRecord) -> dict:
    """Everything that must match, as bytes and plain values."""
    return {
        "arrays": {k: a.numpy().tobytes() for k, a in arrays.items()},
        "order": list(arrays.keys()),
        "router": {k: v.numpy().tobytes() for k, v in strategy.router.state_dict().items()},
        "bank": {k: v.numpy().tobytes() for k, v in strategy.task.bank.to_tensors().items()},
        "q": strategy.minimax.q.tobytes(),
        "history": {r: strategy.history[r] for r in sorted(strategy.history)},
        "draws": (random.random(), float(np.random.rand()), torch.rand(2).numpy().tobytes()),
    }


def save(run_dir, server_round, strategy, arrays, cfg=None) -> None:
    save_checkpoint(
        run_dir,
        server_round,
        arrays,
        strategy.state_for_checkpoint(),
        [{"round": r} for r in range(server_round + 1)],
        config=(cfg or RunConfig()).to_flower(),
        state_key=KEY,
        num_clients=4,
    )


def test_a_restored_strategy_continues_bit_for_bit(tmp_path):
    """Router (dropout draws from torch's global RNG), its Adam moments and steps, the
    prototype bank, minimax q, history and the RNGs all come back exactly."""
    torch.manual_seed(123)
    first = rcsr()
    arrays = play(first, ArrayRecord(theta(0)), (1, 2))
    random.seed(5)
    np.random.seed(6)
    save(tmp_path, 2, first, arrays)
    expected = snapshot(first, play(first, arrays, (3, 4)))

    torch.manual_seed(999)  # a new process: other RNG states, a freshly built strategy
    random.seed(1)
    np.random.seed(2)
    files = list((tmp_path / "checkpoint").iterdir())
    assert sorted(p.suffix for p in files) == [".json", ".safetensors"]  # no pickles
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.state_key == KEY and ckpt.num_clients == 4
    assert [r["round"] for r in ckpt.rows] == [0, 1, 2]
    second = rcsr()
    second.restore_from_checkpoint(ckpt.strategy_tensors, ckpt.strategy_meta)
    assert second.router_opt.state_dict()["state"][0]["step"].item() == 2
    restore_rng(ckpt)
    assert snapshot(second, play(second, ckpt.arrays, (3, 4))) == expected


def test_a_kill_before_the_commit_point_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    s = rcsr()
    arrays = play(s, ArrayRecord(theta(0)), (1,))
    save(tmp_path, 1, s, arrays)
    real = checkpoint.durable_replace

    def die_at_commit(tmp, final):
        if final.name == checkpoint.LATEST:
            raise KeyboardInterrupt("killed")  # the round-2 tensors are written, not committed
        real(tmp, final)

    monkeypatch.setattr(checkpoint, "durable_replace", die_at_commit)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, s, play(s, arrays, (2,)))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1
    assert all(ckpt.arrays[k].numpy().tobytes() == arrays[k].numpy().tobytes() for k in arrays)


def test_a_tampered_tensor_file_is_refused(tmp_path):
    s = rcsr()
    save(tmp_path, 1, s, play(s, ArrayRecord(theta(0)), (1,)))
    path = next((tmp_path / "checkpoint").glob("round-*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_checkpoint(tmp_path)


def resume_case(tmp_path, done: int, **now):
    run = tmp_path / "run"
    cfg = RunConfig(num_server_rounds=4, output_dir=str(tmp_path), run_name="run").replace()
    s = rcsr()
    save(run, done, s, ArrayRecord(theta(0)), cfg)
    return run, cfg.replace(**now)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_resume_refuses_a_different_config_naming_the_keys(tmp_path):
    run, cfg = resume_case(tmp_path, 2, lr=0.5, seed=3, run_name="other")
    with pytest.raises(ConfigError) as exc:
        resume(cfg.replace(resume_from=str(run)), tmp_path / "other")
    message = one_line(exc)
    assert "'lr' (checkpoint 0.001, now 0.5), 'seed' (checkpoint 0, now 3)" in message
    assert "run-name" not in message.split(";")[0]  # allowed to change: not a mismatch


def test_resume_accepts_changes_to_locations_timeouts_and_faults(tmp_path):
    run, cfg = resume_case(
        tmp_path, 2, round_timeout=5.0, fault_injection="raise:0@3", cache_dir="/elsewhere"
    )
    ckpt = resume(cfg.replace(resume_from=str(run)), run)
    assert ckpt.round == 2 and ckpt.num_rounds == 4


def test_resume_refuses_a_finished_run_and_a_directory_without_checkpoint(tmp_path):
    run, cfg = resume_case(tmp_path, 4)
    with pytest.raises(ConfigError) as exc:
        resume(cfg.replace(resume_from=str(run)), run)
    assert "already finished all 4 rounds" in one_line(exc)
    assert resume(cfg, run) is None  # a new run may overwrite a finished one
    with pytest.raises(ConfigError) as exc:
        resume(cfg.replace(resume_from=str(tmp_path / "nothing")), run)
    assert "no checkpoint in" in one_line(exc)


def test_a_new_run_does_not_overwrite_an_unfinished_one(tmp_path):
    run, cfg = resume_case(tmp_path, 2)
    with pytest.raises(ConfigError) as exc:
        resume(cfg, run)
    message = one_line(exc)
    assert "holds an unfinished run (checkpoint after round 2 of 4)" in message
    assert f'continue it with resume-from="{run}"' in message


def resume(cfg, out):
    """The retrieval app's resume point: its validated config, and the keys it lets a
    resumed run change."""
    from rcsr_flower.config import RESUME_MAY_CHANGE
    from rcsr_flower.routing.checkpoint import resume_point

    return resume_point(cfg.to_flower(), out, RESUME_MAY_CHANGE)
