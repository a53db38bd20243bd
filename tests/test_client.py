"""Client round (§3, §4) on the real embedded backbone and corpus."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from test_strategy import task_identity  # noqa: F401

from rcsr_flower.client.data import ClientData
from rcsr_flower.client.handlers import (
    PERSONAL_KEY,
    PREVIOUS_DELTA_KEY,
    ClientNode,
    handle_evaluate,
    handle_query,
    handle_train,
    light_query,
)
from rcsr_flower.client.training import bootstrap_groups
from rcsr_flower.config import RunConfig
from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.faults import InjectedFault
from rcsr_flower.retrieval.evaluation import SplitTensors, preprocess_split
from rcsr_flower.retrieval.prototypes import PrototypeBank


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
    from rcsr_flower.client import losses

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
        round_config(lr=1e-4, **{"anchoring-loss": "ce"}),
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
    assert g["image_means"].shape[0] == g["counts"].shape[0] == 8
    assert g["counts"].sum().item() == 32
    unimodal = node_for(backbone, splits, "text-only")
    assert "groups" not in handle_query(
        unimodal, ConfigRecord({"kind": "bootstrap", "prototype-slots": 32})
    )


def test_a_resumed_node_continues_from_its_snapshot_not_from_a_round_ahead(
    backbone, splits, bank, tmp_path
):
    """A resumed run is a new Flower run: its nodes start with an empty ``context.state``.

    Rounds 1–2 with the live state; then "the server was killed in round 2 and resumed":
    round 2 again with an empty state must load the snapshot after round 1 (not the one of
    round 2, which the killed server never checkpointed) and reply bit for bit the same.
    """
    node = node_for(
        backbone, splits, "paired", personal_adapters=True, client_state_dir=str(tmp_path)
    )
    protos = ArrayRecord(bank.to_tensors())
    key = "ab" * 16
    first = ArrayRecord({k: v.detach().cpu() for k, v in node.adapters().state_dict().items()})
    live = RecordDict()
    config = round_config(**{"state-key": key})
    arrays = ArrayRecord(handle_train(node, first, config, protos, live)["arrays"])
    config = round_config(**{"server-round": 2, "state-key": key})
    out = handle_train(node, arrays, config, protos, live)
    store = node.state_store(ConfigRecord({"state-key": key}))
    assert sorted(store.snapshots()) == [1, 2]
    resumed = RecordDict()
    again = handle_train(node, arrays, config, protos, resumed)
    assert out["stats"]["geometry"][2] != 0.0  # cos(Δ, Δ_prev): the restored Δ_prev is used
    for part in ("arrays", "stats"):
        assert all(torch.equal(out[part][k], again[part][k]) for k in out[part]), part
    for record in (PERSONAL_KEY, PREVIOUS_DELTA_KEY):
        a, b = live[record].to_torch_state_dict(), resumed[record].to_torch_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), record
    # evaluation after a resume uses the same personal adapters
    evaluate_config = ConfigRecord({"server-round": 2, "state-key": key})
    resumed_eval, live_eval = (
        {
            k: v
            for k, v in handle_evaluate(node, arrays, st, evaluate_config).items()
            if not k.endswith("-seconds")
        }  # wall clock
        for st in (RecordDict(), live)
    )
    assert resumed_eval == live_eval
    released = light_query(
        {"client-state-dir": str(tmp_path)},
        {"partition-id": node.partition_id, "num-partitions": 4},
        ConfigRecord({"kind": "release-state", "state-key": key}),
    )
    assert released == {"released": 1} and not any(tmp_path.iterdir())


def test_a_state_key_from_the_network_cannot_name_another_directory(backbone, splits, tmp_path):
    node = node_for(backbone, splits, "paired", client_state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="is not 32 lowercase hex digits"):
        node.state_store(ConfigRecord({"state-key": "../" * 4 + "etc"}))


def test_a_diverged_update_is_not_kept_as_the_previous_update(backbone, splits, bank):
    node = node_for(backbone, splits, "paired", fault_injection="nan:0@2")
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    state = RecordDict({PREVIOUS_DELTA_KEY: ArrayRecord({k: v + 1 for k, v in theta.items()})})
    out = handle_train(
        node,
        ArrayRecord(theta),
        round_config(**{"server-round": 2}),
        ArrayRecord(bank.to_tensors()),
        state,
    )
    assert all(torch.isnan(v).all() for v in out["arrays"].values())  # what the server drops
    # next round's cos(Δ, Δ_prev) is 0 (no previous update), not NaN for ever after
    assert PREVIOUS_DELTA_KEY not in state.array_records


def test_an_injected_raise_fails_the_handler(backbone, splits):
    node = node_for(backbone, splits, "paired", fault_injection="raise:*@2")
    theta = ArrayRecord({k: v.detach().cpu() for k, v in node.adapters().state_dict().items()})
    with pytest.raises(InjectedFault, match="client 0 raises in round 2"):
        handle_train(node, theta, round_config(**{"server-round": 2}), None, RecordDict())


def test_router_tokens_of_real_updates_are_bounded_and_tell_image_only_clients_apart(
    backbone, splits, bank
):
    """§4 (ours, revised): real Δ of a paired, two image-only and a text-only client
    through the real client and server code; every token feature stays O(1), and two
    image-only clients that report different prototypes get different router weights."""
    from flwr.app import MetricRecord

    from rcsr_flower.routing import SemanticRouter
    from rcsr_flower.routing.aggregation import updates_of, validate_replies
    from rcsr_flower.server.retrieval_task import RetrievalTask

    train, test = splits

    def client(modality: str, items: slice, pid: int) -> ClientNode:
        part = SplitTensors(
            train.pixels[items] if modality != "text-only" else None,
            train.captions[items] if modality != "image-only" else None,
        )
        cfg = RunConfig(batch_size=8, prototype_samples=24)
        return ClientNode(cfg, backbone, ClientData(pid, modality, part, test), pid, 4)

    nodes = [
        client("paired", slice(0, 24), 0),
        client("image-only", slice(0, 24), 1),
        client("image-only", slice(24, 48), 2),
        client("text-only", slice(24, 48), 3),
    ]
    theta = {k: v.detach().cpu() for k, v in nodes[0].adapters().state_dict().items()}
    protos = ArrayRecord(bank.to_tensors())
    config = round_config(**{"lr": 1e-2})
    replies = []
    for node in nodes:
        out = handle_train(node, ArrayRecord(theta), config, protos, RecordDict())
        content = RecordDict(
            {
                "arrays": ArrayRecord(out["arrays"]),
                "metrics": MetricRecord(out["metrics"]),
                "stats": ArrayRecord(out["stats"]),
            }
        )
        replies.append(
            Message(
                content,
                reply_to=Message(
                    RecordDict(), dst_node_id=node.partition_id + 1, message_type=MessageType.TRAIN
                ),
            )
        )
    task = RetrievalTask(bank)
    reports, dropped = validate_replies(replies, ArrayRecord(theta), task, num_clients=4)
    assert not dropped and [r.client_id for r in reports] == [0, 1, 2, 3]
    tokens = torch.stack(
        [
            task.token(r, u)
            for r, u in zip(reports, updates_of(reports, ArrayRecord(theta)), strict=True)
        ]
    )
    assert tokens.abs().max().item() < 1e3
    share = [r.summary.geometry[1].item() for r in reports]
    assert share[1] == share[2] == 1.0 and share[3] == 0.0 and 0.0 < share[0] < 1.0
    assert not torch.allclose(reports[1].summary.p_image, reports[2].summary.p_image)
    torch.manual_seed(0)
    router = SemanticRouter(task.token_dim, hidden=32, heads=4).eval()
    with torch.no_grad():
        w = router(tokens)
    assert abs(w[1].item() - w[2].item()) > 1e-4, w


def test_personalised_evaluation_uses_the_personal_adapters(backbone, splits):
    """§6: a client scores θ + its own personal adapters; non-zero personal adapters
    must change its score, and an empty state scores the shared adapters alone."""
    node = node_for(backbone, splits, "paired", personal_adapters=True)
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    alone = handle_evaluate(node, ArrayRecord(theta), RecordDict())
    g = torch.Generator().manual_seed(3)
    personal = {
        k: torch.randn(v.shape, generator=g) * 0.5
        for k, v in node.personal(RecordDict()).state_dict().items()
    }
    state = RecordDict({PERSONAL_KEY: ArrayRecord(personal)})
    with_personal = handle_evaluate(node, ArrayRecord(theta), state)
    scores = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum")
    assert [alone[k] for k in scores] != [with_personal[k] for k in scores]
    shared_only = node_for(backbone, splits, "paired")  # no personal adapters configured
    assert handle_evaluate(shared_only, ArrayRecord(theta), state)["rsum"] == alone["rsum"]


def test_unimodal_clients_keep_no_personal_adapters_unless_personal_unimodal(
    backbone, splits, bank
):
    """With no pairs, a unimodal client's personal adapters could learn only anchoring:
    under RCSR it trains and is scored with the shared adapters alone (nothing personal
    in its state) unless ``personal-unimodal``; paired clients and FedPer keep theirs."""

    def trained_state(modality, **cfg):
        node = node_for(backbone, splits, modality, personal_adapters=True, **cfg)
        theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
        state = RecordDict()
        handle_train(
            node, ArrayRecord(theta), round_config(), ArrayRecord(bank.to_tensors()), state
        )
        return node, theta, state

    for modality in ("image-only", "text-only"):
        node, theta, state = trained_state(modality)
        assert not node.keeps_personal_adapters and node.personal(state) is None
        assert PERSONAL_KEY not in state.array_records
        # its personalised score is the shared adapters' score
        shared_only = node_for(backbone, splits, modality)
        assert (
            handle_evaluate(node, ArrayRecord(theta), state)["rsum"]
            == handle_evaluate(shared_only, ArrayRecord(theta), RecordDict())["rsum"]
        )
        node, _, state = trained_state(modality, personal_unimodal=True)
        assert node.keeps_personal_adapters and PERSONAL_KEY in state.array_records
    node, _, state = trained_state("paired")
    assert node.keeps_personal_adapters and PERSONAL_KEY in state.array_records
    fedper = node_for(backbone, splits, "image-only", strategy="fedper")
    assert fedper.keeps_personal_adapters
