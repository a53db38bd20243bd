"""The experiment suite: suite files, the runner's bookkeeping, the report, and the smoke
suite through the real Flower path (``python -m rcsr_flower.experiments``)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from rcsr_flower.experiments.__main__ import main
from rcsr_flower.experiments.report import (
    archive_cells,
    readme_block,
    stale_cells,
    unimodal_share,
    update_readme,
    write_report,
)
from rcsr_flower.experiments.runner import config_changes, run_suite
from rcsr_flower.experiments.stats import paired_t
from rcsr_flower.experiments.suite import Suite, SuiteError

ROOT = Path(__file__).resolve().parents[1]

SUITE = """
description = "a test suite"
seeds = [0, 1]
num-supernodes = 4
timeout = 60

[config]
num-server-rounds = 2

[settings.A]
label = "A: iid"
config = {{ partitioning = "iid", missing-rate = 0.0 }}

[settings.B]
label = "B: non-iid, missing"
config = {{ partitioning = "dirichlet", alpha = 0.1, missing-rate = 0.5 }}

[methods.fedavg]
config = {{ strategy = "fedavg" }}

[methods.rcsr]
label = "RCSR"
config = {{ strategy = "rcsr" }}

[methods.local]
config = {{ strategy = "local" }}

[methods.central]
pooled = true
num-supernodes = 1

[methods.central.config]
strategy = "fedavg"
partitioning = "iid"
missing-rate = 0.0
min-train-nodes = 1
min-evaluate-nodes = 1
min-available-nodes = 1
{extra}
"""


def write_suite(tmp_path: Path, extra: str = "", name: str = "t") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(SUITE.format(extra=extra))
    return path


# ============================================================================ statistics
def test_paired_t_on_hand_values():
    # d = a - b = [2, 3, 4]: mean 3, sd 1, se 1/sqrt(3), t = 3 sqrt(3), 2 degrees of freedom.
    # With 2 df the t distribution has a closed form, F(t) = 1/2 + t / (2 sqrt(2 + t^2)):
    # p = 2 (1 - F(5.19615)) = 1 - 5.19615 / sqrt(29) = 0.035098,
    # t_0.975 = sqrt(2 * 0.95^2 / (1 - 0.95^2)) = 4.302653, interval 3 -+ 4.302653/sqrt(3)
    r = paired_t([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert r.n == 3 and r.mean == pytest.approx(3.0)
    assert r.p == pytest.approx(1 - 3 * math.sqrt(3) / math.sqrt(29), abs=1e-9)
    half = math.sqrt(2 * 0.95**2 / (1 - 0.95**2)) / math.sqrt(3)
    assert (r.low, r.high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert str(r) == "+3.0 [+0.5, +5.5], p=0.035"
    # antisymmetric; one pair: nothing to estimate; no spread: a point
    s = paired_t([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert (s.mean, s.low, s.high, s.p) == pytest.approx((-3.0, -r.high, -r.low, r.p))
    assert paired_t([1.0], [0.0]) is None
    same = paired_t([2.0, 3.0], [1.0, 2.0])
    assert (same.mean, same.low, same.high, same.p) == (1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        paired_t([1.0, 2.0], [1.0])


# ============================================================================ suite files
def test_suite_cells_and_overrides(tmp_path):
    suite = Suite.load(write_suite(tmp_path))
    cells = suite.cells()
    assert [c.id for c in cells] == [
        "A/fedavg/seed-0",
        "A/fedavg/seed-1",
        "A/rcsr/seed-0",
        "A/rcsr/seed-1",
        "A/local/seed-0",
        "A/local/seed-1",
        "B/fedavg/seed-0",
        "B/fedavg/seed-1",
        "B/rcsr/seed-0",
        "B/rcsr/seed-1",
        "B/local/seed-0",
        "B/local/seed-1",
        "pooled/central/seed-0",
        "pooled/central/seed-1",
    ]
    b = next(c for c in cells if c.id == "B/rcsr/seed-1")
    assert b.overrides == {
        "num-server-rounds": 2,
        "partitioning": "dirichlet",
        "alpha": 0.1,
        "missing-rate": 0.5,
        "strategy": "rcsr",
        "seed": 1,
    }
    assert b.num_supernodes == 4 and b.directory(tmp_path) == tmp_path / "B" / "rcsr" / "seed-1"
    pooled = next(c for c in cells if c.setting == "pooled")
    assert pooled.num_supernodes == 1 and "alpha" not in pooled.overrides  # no setting
    assert [c.id for c in suite.cells([3], "rcsr")] == ["A/rcsr/seed-3", "B/rcsr/seed-3"]
    assert [c.id for c in suite.cells(None, "B/*/seed-0")] == [
        "B/fedavg/seed-0",
        "B/rcsr/seed-0",
        "B/local/seed-0",
    ]
    suite.check(ROOT, cells)  # every cell is a valid run config for its federation
    assert suite.reference == "rcsr"


def test_a_method_limited_to_some_settings_has_cells_there_only(tmp_path):
    ablation = (
        '[methods.ablation]\nsettings = ["B"]\nconfig = { strategy = "rcsr", router = false }'
    )
    suite = Suite.load(write_suite(tmp_path, ablation))
    assert [c.id for c in suite.cells(None, "ablation")] == [
        "B/ablation/seed-0",
        "B/ablation/seed-1",
    ]
    assert [c.id for c in suite.cells(None, "A/*/seed-0")] == [
        "A/fedavg/seed-0",
        "A/rcsr/seed-0",
        "A/local/seed-0",
    ]
    method = suite.method("ablation")
    assert method.runs_in("B") and not method.runs_in("A")
    assert not suite.method("central").runs_in("A")  # a pooled method's cells are its own


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('["C"]', r"\[methods.x\]: 'settings' names no \[settings.C\]; have: A, B"),
        ("[]", r"'settings' must be a list of setting names, got \[\]"),
        ('"B"', r"'settings' must be a list of setting names, got 'B'"),
    ],
)
def test_a_methods_settings_must_name_settings_of_the_suite(tmp_path, settings, message):
    extra = f'[methods.x]\nsettings = {settings}\nconfig = {{ strategy = "rcsr" }}'
    with pytest.raises(SuiteError, match=message):
        Suite.load(write_suite(tmp_path, extra))
    pooled = '[methods.y]\npooled = true\nsettings = ["A"]'
    with pytest.raises(SuiteError, match="a pooled method has no settings; drop 'settings'"):
        Suite.load(write_suite(tmp_path, pooled))


@pytest.mark.parametrize(
    "comparisons", ['[["rcsr", "nope"]]', '[["rcsr", "rcsr"]]', '[["rcsr"]]', '"rcsr"']
)
def test_comparisons_name_two_different_methods_of_the_suite(tmp_path, comparisons):
    (tmp_path / "c.toml").write_text(f"comparisons = {comparisons}\n" + SUITE.format(extra=""))
    with pytest.raises(SuiteError, match=r"'comparisons' = .*\[method, baseline\] pairs"):
        Suite.load(tmp_path / "c.toml")


def test_a_key_the_config_does_not_know_stops_the_suite_before_anything_runs(tmp_path, capsys):
    path = write_suite(
        tmp_path, '[methods.bad]\nconfig = { strategy = "rcsr", tower-aggregaton = false }'
    )
    code = main(
        [
            "run",
            "--suite",
            str(path),
            "--output-root",
            str(tmp_path / "out"),
            "--app-dir",
            str(ROOT),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert (
        "[settings.A] + [methods.bad]" in err and "unknown run-config key 'tower-aggregaton'" in err
    )
    assert not (tmp_path / "out").exists()
    # bad values, federation minimums and suite keys are named the same way
    path = write_suite(tmp_path, "[methods.bad]\nconfig = { alpha = 0.0 }")
    assert main(["run", "--suite", str(path), "--app-dir", str(ROOT)]) == 2
    assert "'alpha' = 0.0 is out of range" in capsys.readouterr().err
    path = write_suite(tmp_path, "[methods.bad]\nconfig = { min-train-nodes = 5 }")
    assert main(["run", "--suite", str(path), "--app-dir", str(ROOT)]) == 2
    assert "'min-train-nodes' = 5 but the federation has 4 clients" in capsys.readouterr().err
    for extra, message in (
        ('[methods.bad]\nlable = "x"', "unknown suite key 'lable'"),
        ("[methods.bad]\nconfig = { seed = 3 }", "'seed' is set by the runner"),
    ):
        with pytest.raises(SuiteError, match=message):
            Suite.load(write_suite(tmp_path, extra))


def test_the_shipped_suites_are_valid():
    smoke = Suite.find("smoke", ROOT)
    assert len(smoke.cells()) == 6 and smoke.seeds == (0,)
    smoke.check(ROOT, smoke.cells())
    embedded = Suite.find("embedded", ROOT)
    assert embedded.seeds == (0, 1, 2) and {s.name for s in embedded.settings} == {
        "S1",
        "S2",
        "S3",
        "S4",
    }
    # a twin or an ablation runs where it differs or is judged; every other method everywhere
    runs = {m.name: m.settings for m in embedded.methods if m.settings is not None}
    assert set(runs) == {
        "fedavg",
        "fedavg-paired",
        "fedper",
        "rcsr-personal-unimodal",
        "rcsr-no-anchoring-personal",
        "rcsr-ce",
        "rcsr-ce-personal",
        "rcsr-no-router",
        "rcsr-no-minimax",
        "rcsr-no-tower",
        "fedavg-paired-half-step",
    }
    assert all(set(s) <= {"S3", "S4"} and "S4" in s for s in runs.values())
    everywhere = len(embedded.methods) - 1 - len(runs)
    assert len(embedded.cells()) == 3 * (4 * everywhere + sum(len(s) for s in runs.values()) + 1)
    embedded.check(ROOT, embedded.cells())
    assert {m.name for m in embedded.methods} == {
        "fedavg",
        "fedavg-tower",
        "fedavg-paired",
        "fedprox",
        "fedper",
        "fedper-tower",
        "local",
        "centralised",
        "rcsr",
        "rcsr-no-router",
        "rcsr-no-minimax",
        "rcsr-no-anchoring",
        "rcsr-no-tower",
        "rcsr-personal",
        "rcsr-personal-unimodal",
        "rcsr-no-anchoring-personal",
        "rcsr-ce",
        "rcsr-ce-personal",
        "fedavg-paired-half-step",
        "fedavg-tower-half-step",
        "rcsr-half-step",
    }


# ============================================================================ local-only
@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def test_local_only_validates_and_records_but_never_aggregates(task_identity):
    from flwr.app import ArrayRecord
    from test_strategy import reply, theta

    from rcsr_flower.routing.local_only import LocalOnlyStrategy
    from rcsr_flower.routing.strategy import RoutingOptions

    s = LocalOnlyStrategy(None, RoutingOptions(mode="local"), num_clients=3)
    s.current = ArrayRecord(theta(0))
    bad = reply(3, {k: v * float("nan") for k, v in theta(3).items()}, 5)
    arrays, metrics = s.aggregate_train(1, [reply(1, theta(1), 10), reply(2, theta(2), 30), bad])
    assert arrays is None  # Flower's loop keeps the global adapters as they were
    assert metrics["num-clients"] == 2
    row = s.history[1]
    assert row["aggregated"] is False and row["weights"] == {} and row["skipped"] is False
    assert list(row["dropped"].values()) == [
        "'arrays.adapters.vision_0.up.weight' has non-finite values"
    ]


def test_a_local_only_client_starts_each_round_from_its_own_adapters():
    from flwr.app import ArrayRecord, RecordDict

    from rcsr_flower.client.handlers import LOCAL_KEY, ClientNode
    from rcsr_flower.config import RunConfig

    server = ArrayRecord({"w": torch.zeros(2)})
    own = RecordDict({LOCAL_KEY: ArrayRecord({"w": torch.ones(2)})})

    def start(strategy: str, state: RecordDict) -> torch.Tensor:
        node = ClientNode(RunConfig(strategy=strategy), None, None, 0, 1)
        return node.starting_adapters(server, state)["w"]

    assert torch.equal(start("local", RecordDict()), torch.zeros(2))  # first round: the server's
    assert torch.equal(start("local", own), torch.ones(2))  # then its own
    assert torch.equal(start("fedavg", own), torch.zeros(2))  # every other method: the server's


# ============================================================================ the runner
def fake_run(path: Path, overrides: dict, status: str = "completed", base: float = 100.0) -> None:
    """What a finished run leaves on disk, with made-up but well-formed numbers."""
    from rcsr_flower.runtime.launch import check_run_config

    path.mkdir(parents=True, exist_ok=True)
    cfg = check_run_config(ROOT, [], dict(overrides)).to_flower()
    (path / "config.json").write_text(json.dumps({**cfg, "output-dir": str(path.parent)}))
    seed, rounds = int(cfg["seed"]), int(cfg["num-server-rounds"])
    local = cfg["strategy"] == "local"
    missing = cfg["missing-rate"] > 0
    modalities = ["paired", "image-only", "paired", "text-only"] if missing else ["paired"] * 4
    clients = [
        {"client_id": i, "modality": m, "num_train": 100 + 50 * i, "num_test": 12, "train": [1]}
        for i, m in enumerate(modalities)
    ]
    (path / "partition.json").write_text(json.dumps({"clients": clients}))
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(rounds + 1):
        rsum = base + (0 if local else 3 * r) + seed
        row = {"round": r, "global": {"rsum": rsum, "i2t_r1": rsum / 20, "t2i_r1": rsum / 25}}
        groups = {}  # personalised from round 0 on: the clients' zero-shot
        for g in sorted(set(modalities)):
            v = 300 + 10 * r + (5 if g == "paired" else 0) + seed
            groups[g] = {"mean": {"rsum": v}, "clients": modalities.count(g)}
        row["personalized"] = {
            "mean": {"rsum": 300 + 10 * r + seed},
            "worst10": {"rsum": 250 + 10 * r + seed},
            "by_group": groups,
        }
        if r > 0:
            picked = rng.choice(4, 2, replace=False)
            w = rng.dirichlet([1, 1])
            row["weights"] = (
                {}
                if local
                else {
                    str(c): {"router": float(w[k]), "minimax": 0.5, "fused": float(w[k])}
                    for k, c in enumerate(picked)
                }
            )
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "result.json").write_text(
        json.dumps({"status": status, "final_global": rows[-1]["global"]})
    )


class FakeLauncher:
    """The launcher's interface (start/stop/run/alive/process) with runs faked on disk;
    a cell with ``eval-every = 7`` fails."""

    runs: ClassVar[list[tuple[str, dict]]] = []
    starts = 0

    def __init__(self, app_dir, flwr_home, timeout):
        self.process = None
        self.run_config: dict = {}
        self.num_supernodes = 0

    def start(self):
        FakeLauncher.starts += 1
        self.process = type("P", (), {"poll": staticmethod(lambda: None)})()

    def stop(self):
        self.process = None

    def alive(self):
        return self.process is not None

    def run(self, run_name, output_dir):
        FakeLauncher.runs.append((str(output_dir / run_name), dict(self.run_config)))
        print("a line of the run's output")
        if self.run_config.get("eval-every") == 7:
            return {"status": "failed", "error": "ServerApp: something broke\ntraceback"}
        fake_run(
            output_dir / run_name, {k: v for k, v in self.run_config.items() if k != "resume-from"}
        )
        return {"status": "completed", "final_global": {"rsum": 123.0}}


@pytest.fixture
def fake():
    FakeLauncher.runs, FakeLauncher.starts = [], 0
    return FakeLauncher


def test_a_failed_cell_does_not_stop_the_others_and_a_rerun_runs_only_what_is_missing(
    tmp_path, fake, capsys
):
    path = write_suite(tmp_path, "[methods.broken]\nconfig = { eval-every = 7 }")
    suite = Suite.load(path)
    cells = suite.cells([0], "A/")
    assert [c.id for c in cells] == [
        "A/fedavg/seed-0",
        "A/rcsr/seed-0",
        "A/local/seed-0",
        "A/broken/seed-0",
    ]
    cells = [cells[3], *cells[:3]]  # the failing cell first
    root = tmp_path / "out"
    outcomes = run_suite(suite, cells, ROOT, root, tmp_path / "flwr", make_launcher=fake)
    assert [o.status for o in outcomes] == ["failed", "completed", "completed", "completed"]
    assert fake.starts == 1 and len(fake.runs) == 4  # one SuperLink for the suite
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("suite t: 4 cells, 4 to run, 0 already completed")
    assert lines[1].startswith("[1/4] A/broken/seed-0 · 3 left · elapsed 0s · ETA ? · FAILED")
    assert "FAILED" in lines[1] and "something broke" in lines[1]
    assert f"(log: {root / 'A/broken/seed-0/run.log'})" in lines[1]
    assert lines[2].startswith("[2/4] A/fedavg/seed-0 · 2 left") and "ETA" in lines[2]
    assert lines[2].endswith("completed in 0s, final global rsum 123.0")
    assert "3/4 cells completed" in out and "1 failed" in out
    log = (root / "A/broken/seed-0/run.log").read_text()
    assert "a line of the run's output" in log and "FAILED: ServerApp: something broke" in log
    assert main(["run", "--suite", str(path), "--app-dir", str(ROOT), "--dry-run"]) == 0

    # the rerun: completed cells are skipped, the failed one is tried again
    fake.runs.clear()
    outcomes = run_suite(suite, cells, ROOT, root, tmp_path / "flwr", make_launcher=fake)
    assert [o.status for o in outcomes] == ["failed", "skipped", "skipped", "skipped"]
    assert [r for r, _ in fake.runs] == [str(root / "A/broken/seed-0")]
    # nothing left to run: no SuperLink either
    fake.runs.clear()
    starts = fake.starts
    run_suite(suite, cells[1:], ROOT, root, tmp_path / "flwr", make_launcher=fake)
    assert fake.runs == [] and fake.starts == starts


def test_a_cut_short_cell_continues_from_its_checkpoint_and_a_changed_one_runs_again(
    tmp_path, fake
):
    suite = Suite.load(write_suite(tmp_path))
    cell_a, cell_b, cell_c = suite.cells([0], "A/")
    root = tmp_path / "out"
    # a: killed after round 1 of 2 (checkpoint, result.json still "running")
    run_a = cell_a.directory(root)
    fake_run(run_a, cell_a.overrides, status="running")
    (run_a / "checkpoint").mkdir()
    (run_a / "checkpoint" / "latest.json").write_text(
        json.dumps({"format": 1, "round": 1, "config": {"num-server-rounds": 2}})
    )
    # b: completed, but with another number of rounds than the suite now asks for
    fake_run(cell_b.directory(root), {**cell_b.overrides, "num-server-rounds": 3})
    # c: killed before its first checkpoint
    fake_run(cell_c.directory(root), cell_c.overrides, status="running")
    outcomes = run_suite(
        suite, [cell_a, cell_b, cell_c], ROOT, root, tmp_path / "f", make_launcher=fake
    )
    assert [o.status for o in outcomes] == ["completed"] * 3
    (_, config_a), (_, config_b), (_, config_c) = fake.runs
    assert config_a["resume-from"] == str(run_a)
    assert "resume-from" not in config_b and "resume-from" not in config_c
    assert "num-server-rounds" in (cell_b.directory(root) / "run.log").read_text()
    # the comparison: paths may differ, keys new since the run count only when set
    assert (
        config_changes({"a": 1, "output-dir": "x"}, {"a": 1, "output-dir": "y", "b": 2}, set())
        == []
    )
    assert config_changes({"a": 1}, {"a": 1, "b": 2}, {"b"}) == ["b"]
    # a key whose default changed what runs do: absent means its old value
    assert config_changes({"a": 1}, {"a": 1, "local-test-items": "auto"}, set()) == [
        "local-test-items"
    ]
    assert config_changes({"a": 1}, {"a": 1, "local-test-items": "0"}, set()) == []
    # a key that mattered only for some runs: RCSR with personal adapters kept them on
    # unimodal clients too; without personal adapters the key changes nothing
    rcsr_personal = {"strategy": "rcsr", "personal-adapters": True}
    assert config_changes(rcsr_personal, {**rcsr_personal, "personal-unimodal": False}, set()) == [
        "personal-unimodal"
    ]
    assert config_changes(rcsr_personal, {**rcsr_personal, "personal-unimodal": True}, set()) == []
    plain = {"strategy": "rcsr", "personal-adapters": False}
    assert config_changes(plain, {**plain, "personal-unimodal": False}, set()) == []


def test_cells_completed_in_the_committed_archive_are_not_run_again(tmp_path, fake, capsys):
    """A suite spread over machines or checkouts: the report's archive (committed) stands
    for a cell whose outputs are not on this machine, unless its config changed since."""
    suite = Suite.load(write_suite(tmp_path))
    cell_a, cell_b, cell_c = suite.cells([0], "A/")
    elsewhere = tmp_path / "other-machine"
    fake_run(cell_a.directory(elsewhere), cell_a.overrides)
    fake_run(cell_b.directory(elsewhere), {**cell_b.overrides, "num-server-rounds": 3})
    archive = tmp_path / "docs" / "results" / suite.name / "cells"
    assert archive_cells(suite, elsewhere, archive) == [cell_a.id, cell_b.id]

    root = tmp_path / "out"  # nothing ran here
    outcomes = run_suite(
        suite,
        [cell_a, cell_b, cell_c],
        ROOT,
        root,
        tmp_path / "f",
        make_launcher=fake,
        archive=archive,
    )
    assert [(o.status, o.note) for o in outcomes] == [
        ("skipped", "archived"),
        ("completed", ""),  # archived with another number of rounds: run again
        ("completed", ""),
    ]
    assert [r for r, _ in fake.runs] == [
        str(cell_b.directory(root)),
        str(cell_c.directory(root)),
    ]
    out = capsys.readouterr().out
    assert "3 cells, 2 to run, 1 already completed" in out
    assert f"{cell_a.id} · 2 left · completed in the report's archive, skipped" in out
    assert not cell_a.directory(root).exists()
    # without the archive it runs
    fake.runs.clear()
    run_suite(suite, [cell_a], ROOT, tmp_path / "out2", tmp_path / "f", make_launcher=fake)
    assert len(fake.runs) == 1


# ============================================================================ the report
def test_report_tables_figures_and_a_byte_identical_rerun_from_the_archive(tmp_path):
    suite = Suite.load(write_suite(tmp_path))
    source = tmp_path / "outputs" / suite.name
    for cell in suite.cells():
        base = {"rcsr": 110.0, "fedavg": 100.0, "local": 90.0, "central": 150.0}[cell.method]
        fake_run(cell.directory(source), cell.overrides, base=base)
        info = {"commit": "abc1234567", "machine": "2-core test CPU"}
        if cell.method == "rcsr":  # runs of older code recorded no load
            info["load_avg_1m"] = {"start": 0.5 + cell.seed, "end": 4.0}
        (cell.directory(source) / "provenance.json").write_text(json.dumps(info))
    shutil.rmtree(suite.cells([1], "B/local")[0].directory(source))  # a missing cell
    archive = tmp_path / "docs" / "cells"
    copied = archive_cells(suite, source, archive)
    assert len(copied) == len(suite.cells()) - 1
    kept = archive / "A" / "rcsr" / "seed-0"
    assert sorted(p.name for p in kept.iterdir()) == [
        "clients.json",
        "config.json",
        "metrics.jsonl",
        "provenance.json",
        "result.json",
    ]
    assert (
        json.loads((kept / "config.json").read_text())["output-dir"]
        == "outputs/experiments/t/A/rcsr"
    )
    assert "train" not in json.loads((kept / "clients.json").read_text())["clients"][0]

    md = write_report(suite, archive, tmp_path / "docs", "cmd").read_text()
    assert str(tmp_path) not in md
    assert "Cells: 13 of 14 completed" in md and "`B/local` (seed 1)" in md
    assert "- machine: `2-core test CPU`" in md and "- commit: `abc1234567`" in md
    # the load of the runs that recorded one (older runs did not), lowest to highest
    recorded = sum(c.method == "rcsr" for c in suite.cells())
    assert f"end): 0.5–4.0 ({recorded} of 13 runs)" in md
    table = md.split("## A: iid")[1].split("## ")[0]
    main_table = table.split("minus each method")[0]
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in main_table.splitlines()
        if line.startswith("|")
    }
    # seeds 0 and 1 add 0 and 1: mean ± sample std; round 0 is the zero-shot row
    assert rows["RCSR"] == (
        "| RCSR | 2 | 116.5 ± 0.7 | 5.8 ± 0.0 | 4.7 ± 0.0 | 320.5 ± 0.7 | 325.5 ± 0.7 | — | — "
        "| 270.5 ± 0.7 |"
    )
    assert rows["zero-shot (round 0)"] == (
        "| zero-shot (round 0) | 2 | 100.5 ± 0.7 | 5.0 ± 0.0 | 4.0 ± 0.0 | 300.5 ± 0.7 "
        "| 305.5 ± 0.7 | — | — | 250.5 ± 0.7 |"
    )
    assert rows["local"].startswith("| local | 2 | — | — | — | 320.5 ± 0.7 |")  # no global model
    assert rows["central"].startswith("| central | 2 | 156.5 ± 0.7 |") and rows["central"].endswith(
        "| — | — | — | — | — |"
    )
    # the unimodal clients' share of the weights: in B (missing modalities) only
    assert "Unimodal clients' share" in md.split("## B")[1]
    assert "Unimodal clients' share" not in table
    shares = md.split("## B")[1].split("| method | seeds | % of participants")[1]
    assert "| RCSR | 2 |" in shares and "| local |" not in shares
    # RCSR − FedAvg = +10 in both seeds: no spread, p = 0
    assert "| fedavg | +10.0 [+10.0, +10.0], p<0.001 | +0.0 [+0.0, +0.0], p=1.000 |" in table
    for png in ("curves.png", "personalised.png", "weights-heatmap.png", "weights-by-client.png"):
        assert (tmp_path / "docs" / png).stat().st_size > 10_000, png
        assert f"]({png})" in md
    # the overview: method × setting, last round's mean ± std (seeds); local-only has
    # no global model, a pooled method no personalised column
    glob, pers = (
        md.split("## Overview: every setting")[1].split("## A: iid")[0].split("Personalised rsum")
    )
    assert "| method | A | B |" in glob
    assert "| RCSR | 116.5 ± 0.7 (2) | 116.5 ± 0.7 (2) |" in glob
    assert "| local | — | — |" in glob and "| central | 156.5 ± 0.7 (2) |" in glob
    assert "| local | 320.5 ± 0.7 (2) | 320.0 (1) |" in pers  # B/local seed 1 is missing
    assert "| central | — | — |" in pers
    # the same numbers as data: summary.json
    summary = json.loads((tmp_path / "docs" / "summary.json").read_text())
    assert summary["suite"] == "t" and summary["reference"] == "rcsr"
    a = summary["settings"]["A"]
    assert a["rcsr"]["global"] == {"mean": 116.5, "std": pytest.approx(0.707, abs=1e-3), "n": 2}
    assert "vs_reference" not in a["rcsr"]
    assert a["fedavg"]["vs_reference"]["global"] == {
        "diff": 10.0,
        "ci": [10.0, 10.0],
        "p": 0.0,
        "n": 2,
    }
    assert a["rcsr"]["personalised"]["all"]["mean"] == 320.5
    assert set(a["rcsr"]["personalised"]) == {"all", "paired", "image-only", "text-only"}
    assert "personalised" not in a["central"] and a["local"]["global"]["n"] == 0
    assert summary["settings"]["B"]["local"]["personalised"]["all"]["n"] == 1
    # the suite's chosen comparisons: RCSR − FedAvg again, with every personalised group
    (tmp_path / "c.toml").write_text(
        'comparisons = [["rcsr", "fedavg"]]\n' + SUITE.format(extra="")
    )
    chosen = Suite.load(tmp_path / "c.toml")
    md_chosen = write_report(chosen, archive, tmp_path / "chosen", "cmd").read_text()
    row = "| RCSR − fedavg | +10.0 [+10.0, +10.0], p<0.001 | +0.0 [+0.0, +0.0], p=1.000 |"
    assert row in md_chosen.split("## A: iid")[1].split("## ")[0]
    assert "Chosen comparisons" not in md
    data = json.loads((tmp_path / "chosen" / "summary.json").read_text())
    assert data["comparisons"]["A"]["rcsr - fedavg"]["global"]["diff"] == 10.0
    assert set(data["comparisons"]["A"]["rcsr - fedavg"]["personalised"]) == {
        "all",
        "paired",
        "image-only",
        "text-only",
    }
    # a fresh clone: the same archive gives the same results.md, byte for byte
    again = write_report(suite, archive, tmp_path / "again", "cmd").read_text()
    assert again == md
    # the README's copy of the overview sits between the suite's markers
    block = readme_block(suite, archive, "cmd")
    assert block.startswith("Generated by `cmd` from 13 of 14 cells")
    assert "| RCSR | 116.5 ± 0.7 (2) | 116.5 ± 0.7 (2) |" in block
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:t:start -->\nold\n<!-- results:t:end -->\n\ntail\n")
    assert update_readme(readme, "t", block) is True
    text = readme.read_text()
    assert "old" not in text and block in text and text.endswith("<!-- results:t:end -->\n\ntail\n")
    assert update_readme(readme, "t", block) is False  # idempotent
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match=r"<!-- results:t:start -->.*add them"):
        update_readme(readme, "t", block)


def test_unimodal_share_of_the_aggregation_weights_by_hand():
    from rcsr_flower.experiments.plot import RunRecord

    clients = [{"client_id": 0, "modality": "paired"}, {"client_id": 1, "modality": "image-only"}]
    clients.append({"client_id": 2, "modality": "text-only"})
    rows = [
        {"round": 0},  # no aggregation: not counted
        {"round": 1, "weights": {"0": {"router": 0.6, "minimax": 0.5, "fused": 0.7},
                                 "1": {"router": 0.4, "minimax": 0.5, "fused": 0.3}}},
        {"round": 2, "weights": {"1": {"router": 0.2, "minimax": 0.25, "fused": 0.1},
                                 "2": {"router": 0.3, "minimax": 0.25, "fused": 0.4},
                                 "0": {"router": 0.5, "minimax": 0.5, "fused": 0.5}}},
    ]  # fmt: skip
    run = RunRecord(Path("x"), rows, {}, {}, clients)
    share = unimodal_share(run)
    # round 1: 1 of 2 participants, router 0.4, minimax 0.5, fused 0.3; round 2: 2 of 3,
    # 0.5, 0.5, 0.5 -> the means
    assert share == pytest.approx(
        {"participants": (1 / 2 + 2 / 3) / 2, "router": 0.45, "minimax": 0.5, "fused": 0.4}
    )
    paired_only = RunRecord(Path("x"), rows, {}, {}, [{"client_id": i, "modality": "paired"}
                                                     for i in range(3)])  # fmt: skip
    assert unimodal_share(paired_only) is None
    assert unimodal_share(RunRecord(Path("x"), rows[:1], {}, {}, clients)) is None


def test_update_alignment_reads_each_groups_own_towers_by_hand():
    from rcsr_flower.experiments.plot import RunRecord
    from rcsr_flower.experiments.report import update_alignment

    clients = [{"client_id": 0, "modality": "paired"}, {"client_id": 1, "modality": "image-only"}]
    clients.append({"client_id": 2, "modality": "text-only"})
    pair = {"vision": {"norm": 1.0, "cos_paired": 0.5}, "text": {"norm": 3.0, "cos_paired": 0.3}}
    rows = [
        {"round": 0},
        {"round": 1, "updates": {"0": pair, "1": {"vision": {"norm": 2.0, "cos_paired": 0.1}}}},
        {"round": 2, "updates": {"1": {"vision": {"norm": 4.0, "cos_paired": -0.1}},
                                 "2": {"text": {"norm": 5.0}}}},  # no other paired client
    ]  # fmt: skip
    got = update_alignment(RunRecord(Path("x"), rows, {}, {}, clients))
    want = {
        "paired": {"cos_paired": 0.4, "norm": 2.0},
        "image-only": {"cos_paired": 0.0, "norm": 3.0},
        "text-only": {"norm": 5.0},
    }
    assert set(got) == set(want)
    for group, values in want.items():
        assert got[group] == pytest.approx(values), group
    assert update_alignment(RunRecord(Path("x"), rows[:1], {}, {}, clients)) is None


def test_report_readme_without_the_suites_markers_is_a_clear_error(tmp_path, capsys):
    suite = write_suite(tmp_path)
    for cell in Suite.load(suite).cells():
        fake_run(cell.directory(tmp_path / "r" / "t" / "cells"), cell.overrides)
    readme = tmp_path / "README.md"
    readme.write_text("# nothing to replace\n")
    args = ["report", "--suite", str(suite), "--results-dir", str(tmp_path / "r")]
    assert main([*args, "--no-archive", "--readme", str(readme)]) == 2
    assert "<!-- results:t:start -->" in capsys.readouterr().err
    assert readme.read_text() == "# nothing to replace\n"
    assert (tmp_path / "r" / "t" / "results.md").is_file()  # the report itself is written


def test_a_report_of_no_cell_is_an_error_naming_the_folder_it_read(tmp_path, capsys):
    suite = write_suite(tmp_path)
    results = tmp_path / "r"
    args = ["report", "--suite", str(suite), "--results-dir", str(results)]
    assert main([*args, "--output-root", str(tmp_path / "elsewhere")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "elsewhere" / "t") in err and "--output-root" in err
    assert not (results / "t" / "results.md").exists()  # nothing overwritten or written
    # given the run's --output-root it finds the cells and names that folder
    source = tmp_path / "runs"
    for cell in Suite.load(suite).cells():
        fake_run(cell.directory(source / "t"), cell.overrides)
    assert main([*args, "--output-root", str(source)]) == 0
    md = (results / "t" / "results.md").read_text()
    assert f"copied there from `{source}/t/`" in md and f"--output-root {source}" in md
    assert (results / "t" / "summary.json").is_file()


def test_archived_cells_run_with_another_config_are_stale(tmp_path):
    """A cell archived before a default changed what runs do (or with other overrides)
    is left out of the report and named, not mixed with the cells run now."""
    from rcsr_flower.experiments.runner import expected_config

    suite = Suite.find("embedded", ROOT)
    cell = next(c for c in suite.cells() if c.id == "S4/rcsr/seed-0")
    path = cell.directory(tmp_path)
    path.mkdir(parents=True)
    config = expected_config(ROOT, cell)
    (path / "config.json").write_text(json.dumps(config))
    assert stale_cells(suite, tmp_path, ROOT) == set()
    del config["local-test-items"]  # archived before the key existed: its old behaviour
    (path / "config.json").write_text(json.dumps(config))
    assert stale_cells(suite, tmp_path, ROOT) == {"S4/rcsr/seed-0"}


def test_the_committed_report_and_readme_overview_are_what_report_writes(tmp_path):
    """Tables come from files the code wrote: the committed results.md of the embedded
    suite and the README's overview are regenerated from the committed cells, unchanged."""
    suite = Suite.find("embedded", ROOT)
    archive = ROOT / "docs" / "results" / "embedded" / "cells"
    command = "python -m rcsr_flower.experiments report --suite embedded"
    stale = stale_cells(suite, archive, ROOT)
    md = write_report(suite, archive, tmp_path, command, stale=stale).read_text()
    assert md == (ROOT / "docs" / "results" / "embedded" / "results.md").read_text()
    block = readme_block(suite, archive, f"{command} --readme README.md", stale)
    readme = (ROOT / "README.md").read_text()
    assert block in readme, (
        "README's overview is stale: run `python -m rcsr_flower.experiments report "
        "--suite embedded --readme README.md`"
    )
    # the default run's per-round table too, from docs/results/default-run/metrics.jsonl
    from rcsr_flower.experiments.plot import RunRecord, run_table

    default_run = ROOT / "docs" / "results" / "default-run"
    assert run_table(RunRecord.load(default_run)) in (default_run / "README.md").read_text()


def test_plot_draws_one_run(tmp_path, capsys):
    from rcsr_flower.experiments.plot import main as plot_main

    run = tmp_path / "outputs" / "run-x"
    fake_run(run, {"strategy": "rcsr", "missing-rate": 0.5, "num-server-rounds": 3})
    assert plot_main([str(run)]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == [
        "curves.png",
        "weights-heatmap.png",
        "weights-by-client.png",
    ]
    assert all(Path(p).parent == run / "plots" for p in written)
    assert plot_main([str(tmp_path / "nothing")]) == 1
    # its per-round table, between the README's markers for the run
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:run-x:start -->\n<!-- results:run-x:end -->\nb\n")
    assert plot_main([str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert f"Generated by `python -m rcsr_flower.experiments.plot {run} --readme {readme}`" in text
    assert (
        "| round | global rsum | i2t R@1 | t2i R@1 | pers. all | pers. paired "
        "| pers. image-only | pers. text-only | pers. worst 10% |"
    ) in text
    # seed 0, base 100: global 100 + 3r; personalised 300 + 10r, paired +5; worst 250 + 10r
    assert "| 2 | 106.0 | 5.3 | 4.2 | 320.0 | 325.0 | 320.0 | 320.0 | 270.0 |" in text
    assert text.startswith("a\n") and text.endswith("<!-- results:run-x:end -->\nb\n")
    readme.write_text("no markers\n")
    assert plot_main([str(run), "--readme", str(readme)]) == 1
    # without the partition there are no client sizes: no empty scatter is drawn
    (run / "partition.json").unlink()
    assert plot_main([str(run), "--out", str(tmp_path / "bare")]) == 0
    assert not (tmp_path / "bare" / "weights-by-client.png").exists()


# ============================================================================ real Flower
@pytest.mark.slow
def test_smoke_suite_through_flower_then_report(tmp_path, embedded_assets, capsys):
    outputs, results = tmp_path / "outputs", tmp_path / "docs"
    # its own results dir: the committed docs/results/smoke/cells would make every cell
    # "completed in the archive" and nothing would run
    # one of its two settings (--only): three real federations, each method's path, and a
    # report of a suite not yet complete; the six cells took 5.5 min on a slow hour here
    args = [
        "--suite",
        "smoke",
        "--app-dir",
        str(ROOT),
        "--output-root",
        str(outputs),
        "--results-dir",
        str(results),
    ]
    started = time.monotonic()
    code = main(["run", *args, "--only", "S4/", "--flwr-home", str(tmp_path / "flwr")])
    seconds = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 0, out
    # the suite is sized for about 3 minutes on a quiet 2-core machine (docs/experiments.md);
    # a shared machine takes longer, so the time is reported, not asserted
    with capsys.disabled():
        print(f"\nsmoke suite: {seconds:.0f} s ({out.count(' completed in ')} cells)")
    suite = Suite.find("smoke", ROOT)
    for cell in suite.cells(only="S4/"):
        run = cell.directory(outputs / "smoke")
        assert json.loads((run / "result.json").read_text())["status"] == "completed", cell.id
        assert (run / "provenance.json").is_file() and (run / "run.log").is_file()
    # local-only aggregates nothing: the server's adapters stay the initial ones
    local = [
        json.loads(x)
        for x in (outputs / "smoke/S4/local/seed-0/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["global"]["rsum"] for r in local] == [local[0]["global"]["rsum"]] * 3
    assert all(r["aggregated"] is False and r["weights"] == {} for r in local[1:])
    assert local[-1]["personalized"]["clients"] == 4
    rcsr = [
        json.loads(x)
        for x in (outputs / "smoke/S4/rcsr/seed-0/metrics.jsonl").read_text().splitlines()
    ]
    assert len(rcsr[-1]["weights"]) == 2 and rcsr[-1]["router_loss"] is not None

    # a rerun finds every cell completed and starts nothing
    started = time.monotonic()
    assert main(["run", *args, "--only", "S4/", "--flwr-home", str(tmp_path / "flwr2")]) == 0
    assert time.monotonic() - started < 30
    assert "3 cells, 0 to run, 3 already completed" in capsys.readouterr().out
    assert not (tmp_path / "flwr2").exists()

    assert main(["report", *args]) == 0
    md = (results / "smoke" / "results.md").read_text()
    assert "Cells: 3 of 6 completed" in md and "| RCSR | 1 |" in md
    for png in ("curves.png", "personalised.png", "weights-heatmap.png", "weights-by-client.png"):
        assert (results / "smoke" / png).stat().st_size > 10_000, png
    # from the archive alone (a fresh clone): the same results.md
    shutil.rmtree(outputs)
    assert main(["report", *args, "--no-archive"]) == 0
    assert (results / "smoke" / "results.md").read_text() == md


@pytest.mark.slow
def test_a_cell_that_fails_in_the_launcher_is_reported_with_its_log(
    tmp_path, embedded_assets, capsys
):
    """Through the real launcher: a cell whose data is missing fails (before its run is
    submitted), a cell already completed is skipped, the exit code says 1."""
    path = tmp_path / "mixed.toml"
    path.write_text(
        "seeds = [0]\nnum-supernodes = 2\n[config]\nnum-server-rounds = 1\n"
        '[settings.A]\nconfig = { partitioning = "iid" }\n'
        '[methods.done]\nconfig = { strategy = "fedavg" }\n'
        '[methods.nodata]\nconfig = { dataset = "/nonexistent/dataset.json" }\n'
    )
    suite = Suite.load(path)
    done = suite.cells(None, "done")[0]
    fake_run(done.directory(tmp_path / "out" / "mixed"), done.overrides)
    args = [
        "run",
        "--suite",
        str(path),
        "--app-dir",
        str(ROOT),
        "--output-root",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--flwr-home", str(tmp_path / "flwr")]) == 1
    out = capsys.readouterr().out
    assert "A/done/seed-0 · 1 left · already completed, skipped" in out
    assert "A/nodata/seed-0 · 0 left" in out and "FAILED" in out and "preparing the data" in out
    log = tmp_path / "out" / "mixed" / "A" / "nodata" / "seed-0" / "run.log"
    assert f"(log: {log})" in out and "nonexistent" in log.read_text()


def test_compare_tells_a_changed_round_from_float_noise(tmp_path, capsys):
    rows = [
        {"round": 0, "global": {"rsum": 301.12, "i2t_r1": 34.0}, "seconds": {"total": 5.0}},
        {"round": 1, "global": {"rsum": 340.0, "i2t_r1": 39.8}, "skipped": False},
    ]

    def write(name: str, rows: list[dict]) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    ref = write("ref", rows)
    noisy = json.loads(json.dumps(rows))
    noisy[0]["seconds"]["total"] = 99.0  # wall time never counts
    noisy[1]["global"]["rsum"] = 340.1
    assert main(["compare", str(write("noisy", noisy)), str(ref)]) == 0
    changed = json.loads(json.dumps(noisy))
    changed[1]["global"]["rsum"] = 339.7  # three retrieval hits fewer
    changed[1]["skipped"] = True
    assert main(["compare", str(write("changed", changed)), str(ref)]) == 1
    out = capsys.readouterr().out
    assert "round 1.global.rsum: 339.7 vs 340.0" in out and "round 1.skipped: True" in out
    assert main(["compare", str(write("short", rows[:1])), str(ref)]) == 1
    assert main(["compare", str(tmp_path / "none"), str(ref)]) == 2


def test_asking_a_cell_whether_it_can_resume_imports_no_torch(tmp_path, fresh_python):
    """The suite runner asks every cell's checkpoint (``latest.json``) whether it can
    resume, and then only waits for its launcher: importing torch for that question held
    0.15 GB in the runner for the whole suite."""
    ckpt = tmp_path / "cell" / "checkpoint"
    ckpt.mkdir(parents=True)
    latest = {"format": 1, "round": 2, "config": {"num-server-rounds": 5}}
    (ckpt / "latest.json").write_text(json.dumps(latest))
    code = (
        "import sys, types; from pathlib import Path; "
        "from rcsr_flower.experiments.runner import inspect_cell; "
        "cell = types.SimpleNamespace(overrides={}); "
        f"print(inspect_cell(cell, Path({str(tmp_path / 'cell')!r}), {{}})[0], "
        "'torch' in sys.modules)"
    )
    lines = fresh_python(code)
    assert lines[-1] == "resume False", lines
