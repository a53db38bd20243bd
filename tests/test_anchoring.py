# ruff: noqa: F811  (the module fixtures of test_client are imported and used as arguments)
"""Anchoring that cannot collapse (``anchoring-loss``, §4) and fixed local work
(``local-steps``), on hand-computed tensors and on the real embedded backbone."""

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, RecordDict
from test_client import bank, node_for, round_config, splits  # noqa: F401

from rcsr_flower.client import losses
from rcsr_flower.client.handlers import handle_train
from rcsr_flower.client.training import TrainSettings, local_train, step_batches


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_soft_anchoring_at_the_teacher_is_only_the_centroid_term():
    protos = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    z = _unit([0.9, 0.1, 0.4], [0.8, -0.2, 0.1], [0.1, 0.9, -0.3])
    slots = torch.tensor([0, 0, 1])
    zz = z.clone().requires_grad_(True)
    loss = losses.anchor_soft(zz, z, protos, slots, 0.5)
    # by hand: slot 0's centroid is the normalised mean of rows 0, 1; slot 1's is row 2
    centroids = F.normalize(torch.stack([z[:2].mean(0), z[2]]), dim=1)
    ce = F.cross_entropy(centroids @ protos.T / 0.5, torch.tensor([0, 1]), reduction="none")
    expected = (2 * ce[0] + ce[1]) / 3
    assert torch.allclose(loss, expected, atol=1e-6)
    # the relational (KL) term is zero with zero gradient at the teacher: the gradient is
    # the centroid term's alone
    loss.backward()
    zc = z.clone().requires_grad_(True)
    cents = F.normalize(torch.stack([zc[:2].mean(0), zc[2]]), dim=1)
    ce_only = F.cross_entropy(cents @ protos.T / 0.5, torch.tensor([0, 1]), reduction="none")
    ((2 * ce_only[0] + ce_only[1]) / 3).backward()
    assert torch.allclose(zz.grad, zc.grad, atol=1e-6)


def test_soft_anchoring_grows_when_a_sample_leaves_its_relation_to_the_prototypes():
    protos = _unit([1.0, 0.0], [0.0, 1.0])
    teacher = _unit([0.6, 0.4], [0.45, 0.55])
    slots = torch.tensor([0, 1])
    at_teacher = losses.anchor_soft(teacher, teacher, protos, slots, 0.1)
    # both samples pulled onto their slot's prototype: the CE optimum, a collapse per slot
    collapsed = _unit([1.0, 0.0], [0.0, 1.0])
    kl = losses.anchor_soft(collapsed, teacher, protos, slots, 0.1) - losses.anchor_soft(
        collapsed, collapsed, protos, slots, 0.1
    )
    assert kl > 0.1
    # the CE form prefers the collapse; the relational term makes soft pay for it
    ce = F.cross_entropy(collapsed @ protos.T / 0.1, slots)
    assert ce < F.cross_entropy(teacher @ protos.T / 0.1, slots)
    assert at_teacher.item() == pytest.approx(
        F.cross_entropy(teacher @ protos.T / 0.1, slots).item(), abs=1e-5
    )


def test_soft_l_proto_on_a_paired_batch_assigns_slots_from_the_teacher_text_side():
    p_image = _unit([1.0, 0.0], [0.0, 1.0])
    p_text = _unit([1.0, 0.2], [0.2, 1.0])
    z_i, z_t = _unit([0.7, 0.3], [0.1, 0.9]), _unit([0.9, 0.1], [0.3, 0.7])
    got = losses.proto_alignment(z_i, z_t, p_image, p_text, 0.1, teacher=(z_i, z_t))
    slots = losses.assign_slots(z_t, p_text)
    want = losses.anchor_soft(z_i, z_i, p_text, slots, 0.1) + losses.anchor_soft(
        z_t, z_t, p_image, slots, 0.1
    )
    assert torch.allclose(got, want)


def _pairwise_cosine(z: torch.Tensor) -> float:
    sim = z @ z.T
    return float((sim.sum() - sim.diagonal().sum()) / (len(z) * (len(z) - 1)))


@pytest.mark.slow
def test_soft_personal_adapters_keep_an_image_only_client_apart_where_ce_collapses_them(
    backbone, splits, bank
):
    """A unimodal client's personal adapters learn from anchoring alone: with the CE the
    client's own test images drift together (its retrieval falls), with ``soft`` they stay
    as spread as the frozen backbone left them."""
    spread = {}
    for kind in ("ce", "soft"):
        node = node_for(
            backbone,
            splits,
            "image-only",
            personal_adapters=True,
            personal_unimodal=True,
            local_steps=12,
        )
        theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
        state = RecordDict()
        for r in range(1, 5):
            out = handle_train(
                node,
                ArrayRecord(theta),
                round_config(**{"server-round": r, "anchoring-loss": kind, "lr": 3e-3}),
                ArrayRecord(bank.to_tensors()),
                state,
            )
            theta = {k: v.detach().cpu() for k, v in out["arrays"].items()}
        shared, personal = node.adapters(theta), node.personal(state)
        with torch.no_grad():
            z = backbone.image_features(node.data.test.pixels, shared, personal)
            zero = backbone.image_features(node.data.test.pixels)
        spread[kind] = _pairwise_cosine(z)
        spread["zero-shot"] = _pairwise_cosine(zero)
    assert spread["ce"] > spread["zero-shot"] + 0.1, spread
    assert spread["soft"] < spread["zero-shot"] + 0.05, spread
    assert spread["soft"] < spread["ce"] - 0.1, spread


def test_local_steps_fix_the_round_work_whatever_the_client_size(backbone, splits, bank):
    node = node_for(backbone, splits, "paired")
    n = len(node.data.train)  # 48 items: 3 batches of 16 an epoch
    for steps in (2, 7):
        out = local_train(
            backbone,
            node.adapters(),
            None,
            node.data,
            bank,
            TrainSettings(lr=1e-3, batch_size=16, steps=steps),
            seed=0,
        )
        assert out["steps"] == steps and out["num_examples"] == n
    plan = list(step_batches(n, 16, epochs=1, steps=7, generator=torch.Generator()))
    assert len(plan) == 7 and all(len(b) == 16 for b in plan)
    # every item once per pass: the first three batches are a permutation
    assert sorted(torch.cat(plan[:3]).tolist()) == list(range(n))
    assert len(list(step_batches(n, 16, epochs=2, steps=0, generator=torch.Generator()))) == 6


def test_soft_anchoring_without_a_teacher_is_a_clear_error(backbone, splits, bank):
    from rcsr_flower.client.training import client_loss

    node = node_for(backbone, splits, "image-only")
    with pytest.raises(ValueError, match="starting adapters"):
        client_loss(
            backbone,
            node.data,
            torch.arange(4),
            [node.adapters()],
            bank,
            TrainSettings(lr=1e-3, anchoring_loss="soft"),
            torch.Generator(),
        )


@pytest.mark.slow
def test_fed_dynamics_runs_soft_anchoring_with_local_steps_on_a_content_partition(
    embedded_assets,
):
    """The in-process probe behind docs/algorithm.md's regime search takes the new knobs
    and ends with its one JSON line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "benchmarks" / "fed_dynamics.py"), "--json"]
    cmd += ["--clients", "4", "--rounds", "1", "--train-max-items", "120"]
    cmd += ["--local-steps", "2", "--anchoring-loss", "soft", "--partition-by", "color"]
    cmd += ["--partition-sizes", "equal", "--personal-adapters", "all", "--seed", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["settings"]["anchoring_loss"] == "soft"
    assert result["settings"]["local_steps"] == 2
    assert [r for r, _ in result["rsum"]] == [0, 1] and result["rsum"][0][1] > 0
    assert len(result["personalised"]) == 2
