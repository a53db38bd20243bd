"""A thousand clients: the settings that size a large federation fail early and say how
to fix them, and a round of 1,000 simulated clients costs what its participants do."""

from __future__ import annotations

import re

import pytest

from rcsr_flower.config import ConfigError, RunConfig
from rcsr_flower.federation import check_population


def test_too_few_items_for_the_clients_fail_naming_the_fix():
    """The default 750 items cannot give 1,000 clients anything to train on: the error
    says how many each needs and which settings give them that."""
    cfg = RunConfig()
    check_population(cfg, 750, 6000, 10)  # the default run: 75 items each
    check_population(cfg, 3000, 6000, 1000)  # 3 each: 2 to train on, 1 held out
    with pytest.raises(ConfigError) as exc:
        check_population(cfg, 750, 6000, 1000)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("train-max-items = 750 gives 1000 clients 0.75 training items")
    assert "set train-max-items >= 3000 (0 = all 6000 of the split)" in message
    assert message.endswith("or run at most 250 clients")
    with pytest.raises(ConfigError, match=re.escape("set embedded-train-items >= 9000")):
        check_population(cfg.replace(train_max_items=0), 6000, 6000, 3000)
    # no held-out split: 2 items a client are enough
    check_population(cfg.replace(local_test_fraction=0.0), 2000, 6000, 1000)
    other = RunConfig(dataset="/data/coco.json", train_max_items=0)
    with pytest.raises(ConfigError) as exc:
        check_population(other, 100, 100, 50)
    assert "the training split's 100 items give 50 clients" in str(exc.value)
    assert "embedded-train-items" not in str(exc.value)


def test_local_test_items_beyond_the_unused_items_fail_naming_the_fix(embedded_assets):
    """``local-test-items`` tops up every client from the items past ``train-max-items``:
    for many clients the total is checked before any client is served."""
    from rcsr_flower import federation

    cfg = RunConfig(train_max_items=4000, partition_sizes="equal", seed=7)
    with pytest.raises(ConfigError) as exc:
        federation.load_partition(cfg, None, 1000)  # "auto" = 50 a client
    message = str(exc.value)
    assert re.search(r"local-test-items = 50 tops up 1000 clients' .* with \d+ training", message)
    assert "and the split has 2000 of them: set local-test-items = 0" in message
    assert "a larger embedded-train-items" in message
