import dataclasses
import itertools
import re
import tomllib
from pathlib import Path

import pytest

from rcsr_flower.config import RESUME_MAY_CHANGE, ConfigError, NodeConfig, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_table_matches_dataclass_defaults():
    table = app_config()
    defaults = RunConfig().to_flower()
    assert set(table) == set(defaults), set(table) ^ set(defaults)
    for key, value in table.items():
        assert defaults[key] == value, key
    assert RunConfig.from_flower(table) == RunConfig()


def test_no_federations_table_in_pyproject():
    # `flwr run` rewrites pyproject.toml when it finds one (FLOWER.md).
    assert "federations" not in tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]


def test_every_spec_hyperparameter_is_configurable():
    keys = set(app_config())
    spec_keys = {
        "num-server-rounds",
        "fraction-train",
        "local-epochs",
        "batch-size",
        "lr",
        "weight-decay",
        "warmup-rounds",
        "min-lr-ratio",
        "partition-clusters",
        "alpha",
        "missing-rate",
        "local-test-fraction",
        "adapter-layers",
        "adapter-bottleneck",
        "prototype-slots",
        "temperature",
        "proto-temperature",
        "lambda-anchor",
        "lambda-align",
        "lambda-stab",
        "router",
        "minimax",
        "anchoring",
        "personal-adapters",
        "prox",
        "router-lr",
        "minimax-eta",
        "minimax-tau",
        "beta-image",
        "beta-text",
        "beta-entropy",
        "beta-axis",
        "eval-every",
        "eval-protocol",
        "strategy",
        "model-name",
    }
    assert spec_keys <= keys, spec_keys - keys


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": 0.0}, "'alpha' = 0.0 is out of range"),
        ({"missing-rate": 1.5}, "'missing-rate' = 1.5 is out of range"),
        ({"strategy": "fedsgd"}, "allowed values are 'rcsr', 'fedavg'"),
        ({"eval-protocol": "1to1"}, "allowed values are 'standard', 'paired'"),
        ({"batch-size": "64"}, "'batch-size' = '64' has type str; expected int"),
        ({"router": 1}, "expected bool"),
        ({"alhpa": 0.3}, "unknown run-config key 'alhpa'"),
        ({"adapter-layers": "last"}, "'adapter-layers'"),
        ({"max-update-norm": -1.0}, "'max-update-norm' = -1.0 is out of range: allowed [0, inf)"),
        ({"min-train-nodes": 0}, "'min-train-nodes' = 0 is out of range: allowed [1, inf)"),
        ({"fraction-train": 0.0}, "'fraction-train' = 0.0 is out of range: allowed (0, 1]"),
        ({"lr": float("nan")}, "'lr' = nan is out of range: allowed (0, inf)"),
        ({"missing-rate": float("nan")}, "'missing-rate' = nan is out of range: allowed [0, 1]"),
        ({"router-heads": 3}, "'router-heads' = 3 does not divide 'router-hidden' = 128"),
        ({"model-name": " "}, "'model-name' is empty"),
        ({"resume-from": 3}, "'resume-from' = 3 has type int; expected str"),
        ({"fault-injection": "raise:0"}, "'fault-injection' = 'raise:0': bad item 'raise:0'"),
        ({"fault-injection": "nan:1@0"}, "rounds start at 1"),
        (
            {"embedded-train-items": 5000},
            "'embedded-train-items' = 5000 is out of range: allowed [6000, inf); the "
            "embedded corpus has its 6000 training items or more; to train on fewer, set "
            "train-max-items",
        ),
        (
            {"embedded-train-items": 12000, "dataset": "/data/flickr30k.json"},
            "'embedded-train-items' = 12000 sizes the embedded corpus",
        ),
    ],
)
def test_bad_values_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_flower({**app_config(), **overrides})


def test_every_error_is_one_line_naming_the_key_and_what_is_allowed():
    bad = {"alpha": 0.0, "missing-rate": -0.1, "eval-protocol": "x", "fault-injection": "?"}
    for key, value in bad.items():
        with pytest.raises(ConfigError) as exc:
            RunConfig.from_flower({**app_config(), key: value})
        message = str(exc.value)
        assert "\n" not in message and f"'{key}'" in message and "allowed" in message


def test_minimums_above_the_federation_size_fail_before_training():
    cfg = RunConfig.from_flower({"min-train-nodes": 5, "min-available-nodes": 2})
    cfg.check_federation(5)
    with pytest.raises(
        ConfigError,
        match=r"'min-train-nodes' = 5 but the federation has 4 clients .*allowed \[1, 4\]",
    ):
        cfg.check_federation(4)
    RunConfig.from_flower({"min-evaluate-nodes": 9, "fraction-evaluate": 0.0}).check_federation(2)


def test_keys_a_resume_may_change_exist():
    assert set(app_config()) >= RESUME_MAY_CHANGE


def test_fault_injection_plan():
    spec = "raise:0@1, nan:*@2,server-kill@3,hang:4@5"
    plan = RunConfig.from_flower({"fault-injection": spec}).faults
    assert plan.client_fault(0, 1) == "raise" and plan.client_fault(1, 1) is None
    assert plan.client_fault(4, 5) == "hang" and plan.client_fault(4, 4) is None
    assert plan.client_fault(7, 2) == "nan" and plan.server_kill_round == 3
    assert RunConfig().faults.client == () and RunConfig().faults.server_kill_round is None


def test_int_accepted_for_float_and_adapter_layers_number():
    cfg = RunConfig.from_flower({"lr": 1, "adapter-layers": 2})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.adapter_layers == "2"


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = RunConfig(num_server_rounds=100, lr=1e-4, warmup_rounds=10, min_lr_ratio=0.01)
    assert cfg.lr_at(1) == pytest.approx(1e-5)
    assert cfg.lr_at(10) == pytest.approx(1e-4)
    assert cfg.lr_at(11) == pytest.approx(1e-4)
    assert cfg.lr_at(100) == pytest.approx(1e-6)
    mids = [cfg.lr_at(r) for r in range(11, 101)]
    assert all(a >= b for a, b in itertools.pairwise(mids))
    # warm-up is capped at a tenth of the rounds
    short = RunConfig(num_server_rounds=20, lr=1.0, warmup_rounds=10)
    assert short.lr_at(2) == pytest.approx(1.0) and short.lr_at(1) == pytest.approx(0.5)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().alpha = 3  # type: ignore[misc]


def test_every_key_is_documented():
    doc = (PYPROJECT.parent / "docs" / "configuration.md").read_text()
    missing = [k for k in app_config() if f"`{k}`" not in doc]
    assert not missing, f"document these keys in docs/configuration.md: {missing}"


def test_every_node_config_key_and_example_error_is_documented():
    doc = (PYPROJECT.parent / "docs" / "configuration.md").read_text()
    section = doc[doc.index("### Per node") : doc.index("## Partition")]
    keys = [f.name.replace("_", "-") for f in dataclasses.fields(NodeConfig)]
    missing = [k for k in keys if f"`{k}`" not in section]
    assert not missing, f"document these node_config keys in docs/configuration.md: {missing}"
    node = {"partition-id": 0, "num-partitions": 4}
    for bad in ({**node, "datset": "/d.json"}, {**node, "dataset": 5}, {**node, "partition-id": 4}):
        with pytest.raises(ConfigError) as exc:
            NodeConfig.from_flower(bad)
        assert f"\n{exc.value}\n" in section  # the examples are what a node gets
