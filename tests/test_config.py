import dataclasses
import itertools
import tomllib
from pathlib import Path

import pytest

from rcsr_flower.config import ConfigError, RunConfig

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
    ],
)
def test_bad_values_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_flower({**app_config(), **overrides})


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
