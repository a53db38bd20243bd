"""Client round (SPEC §3, §4) on the real embedded backbone and corpus."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from rcsr_flower.client import (
    PERSONAL_KEY,
    PREVIOUS_DELTA_KEY,
    ClientNode,
    handle_evaluate,
    handle_query,
    handle_train,
)
from rcsr_flower.config import RunConfig
from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.prototypes import PrototypeBank
from rcsr_flower.task import ClientData, SplitTensors, bootstrap_groups, preprocess_split


@pytest.fixture(scope="module")
def splits(embedded_assets, backbone):
    train = open_dataset(embedded_assets.corpus_json, "train").subset(range(48))
    test = open_dataset(embedded_assets.corpus_json, "test").subset(range(12))
    return preprocess_split(backbone, train), preprocess_split(backbone, test)


def node_for(backbone, splits, modality, **cfg) -> ClientNode:
    train, test = splits
    train = SplitTensors(
        train.pixels if modality != "text-only" else None,
        train.captions if modality != "image-only" else None,
    )
    config = RunConfig(batch_size=16, prototype_samples=32, **cfg)
    return ClientNode(config, backbone, ClientData(0, modality, train, test), 0, 4)


@pytest.fixture(scope="module")
def bank(backbone, splits):
    data = ClientData(0, "paired", *splits)
    g = bootstrap_groups(backbone, data, num_slots=4, limit=48, seed=0)
    return PrototypeBank.bootstrap([g["image_means"]], [g["text_means"]], [g["counts"]], 4)


def round_config(**extra):
    return ConfigRecord(
        {"server-round": 1, "lr": 1e-3, "anchoring": True, "prox-mu": 0.01, **extra}
    )


class TowerCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


@pytest.mark.parametrize(
    ("modality", "trained", "absent"),
    [("image-only", "vision", "text"), ("text-only", "text", "vision")],
)
def test_unimodal_client_never_runs_the_missing_tower_and_only_adapts_its_own(
    backbone, splits, bank, modality, trained, absent
):
    node = node_for(backbone, splits, modality)
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    missing = backbone.model.text_model if absent == "text" else backbone.model.vision_model
    counter = TowerCounter(missing)
    try:
        out = handle_train(
            node, ArrayRecord(theta), round_config(), ArrayRecord(bank.to_tensors()), RecordDict()
        )
    finally:
        counter.handle.remove()
    assert counter.calls == 0
    moved = {k for k in theta if not torch.equal(out["arrays"][k], theta[k])}
    assert moved and all(k.startswith(f"adapters.{trained}_") for k in moved)
    stats = out["stats"]
    assert stats["mask"].tolist() == ([1.0, 0.0] if modality == "image-only" else [0.0, 1.0])
    assert f"{absent.replace('vision', 'image')}_sum" not in stats
    # the missing side's prototype is the current global one, flagged by the mask
    g = bank.g_text if absent == "text" else bank.g_image
    side = "p_text" if absent == "text" else "p_image"
    assert torch.equal(stats[side], g)


def test_anchoring_lowers_the_anchor_loss_of_an_image_only_client(backbone, splits, bank):
    from rcsr_flower import losses

    node = node_for(backbone, splits, "image-only")
    shared = node.adapters()
    pixels = node.data.train.pixels

    def anchor_loss(adapters):
        with torch.no_grad():
            z = backbone.image_features(pixels, adapters)
            return losses.anchor_ce(z, bank.text, losses.assign_slots(z, bank.image), 0.07)

    before = anchor_loss(shared)
    theta = {k: v.detach().cpu() for k, v in shared.state_dict().items()}
    out = handle_train(
        node,
        ArrayRecord(theta),
        round_config(lr=1e-4),
        ArrayRecord(bank.to_tensors()),
        RecordDict(),
    )
    assert anchor_loss(node.adapters(out["arrays"])) < before


def test_personal_adapters_persist_in_state_and_never_travel(backbone, splits, bank):
    node = node_for(backbone, splits, "paired", personal_adapters=True)
    state = RecordDict()
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    out1 = handle_train(
        node, ArrayRecord(theta), round_config(), ArrayRecord(bank.to_tensors()), state
    )
    assert PERSONAL_KEY in state.array_records and PREVIOUS_DELTA_KEY in state.array_records
    personal1 = state[PERSONAL_KEY].to_torch_state_dict()
    out2 = handle_train(
        node,
        ArrayRecord(out1["arrays"]),
        round_config(**{"server-round": 2}),
        ArrayRecord(bank.to_tensors()),
        state,
    )
    personal2 = state[PERSONAL_KEY].to_torch_state_dict()
    assert any(not torch.equal(personal1[k], personal2[k]) for k in personal1)
    # the reply carries exactly the shared adapters, nothing personal
    assert set(out2["arrays"]) == set(theta)
    assert all(not torch.equal(out2["arrays"][k], personal2[k]) for k in theta if ".up." in k)
    # geometry's cos(Δ, Δ_prev) is defined from round 2 on
    assert out1["stats"]["geometry"][2] == 0.0 and out2["stats"]["geometry"][2] != 0.0
    # the node's personal adapters are the stored ones and change its embeddings
    restored = node.personal(state)
    assert all(torch.equal(restored.state_dict()[k], personal2[k]) for k in personal2)
    shared = node.adapters(out2["arrays"])
    pixels = node.data.test.pixels
    with torch.no_grad():
        assert not torch.allclose(
            backbone.image_features(pixels, shared, restored),
            backbone.image_features(pixels, shared),
        )
    assert "rsum" in handle_evaluate(node, ArrayRecord(out2["arrays"]), state)


def test_empty_client_replies_zero_examples_without_crashing(backbone, splits, bank):
    train, test = splits
    empty = SplitTensors(train.pixels[:0], [])
    node = ClientNode(RunConfig(), backbone, ClientData(0, "paired", empty, test), 0, 2)
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    out = handle_train(node, ArrayRecord(theta), round_config(), None, RecordDict())
    assert out["metrics"]["num-examples"] == 0 and out["metrics"]["steps"] == 0
    assert all(torch.equal(out["arrays"][k], theta[k]) for k in theta)


def test_bootstrap_query_reply(backbone, splits):
    node = node_for(backbone, splits, "paired")
    out = handle_query(node, ConfigRecord({"kind": "bootstrap", "prototype-slots": 32}))
    g = out["groups"]
    # over prototype-samples = 32 local items: min(C, n/4) = min(32, 32 // 4) = 8 groups
    assert g["image_means"].shape[0] == g["counts"].shape[0] <= 8
    assert g["counts"].sum().item() == 32
    unimodal = node_for(backbone, splits, "text-only")
    assert "groups" not in handle_query(
        unimodal, ConfigRecord({"kind": "bootstrap", "prototype-slots": 32})
    )
