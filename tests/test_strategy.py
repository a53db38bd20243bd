"""The strategy on real Flower ``Message`` replies (no simulation): §5 steps 1–8."""

import io
import json
import pickle
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from rcsr_flower.retrieval.prototypes import PrototypeBank
from rcsr_flower.routing.strategy import RCSRStrategy, RoutingOptions
from rcsr_flower.server.retrieval_task import (
    TOWER_GROUPS,
    PersonalizedRetrieval,
    RetrievalTask,
    personalized_summary,
)

D, C = 4, 3


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def theta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "adapters.vision_0.up.weight": torch.randn(3, 2, generator=g),
        "adapters.text_0.up.weight": torch.randn(2, 2, generator=g),
    }


def stats(seed: int, mask=(1.0, 1.0)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    out = {
        "p_image": torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0),
        "p_text": torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0),
        "geometry": torch.rand(4, generator=g),
        "mask": torch.tensor(mask),
    }
    for i, side in enumerate(("image", "text")):
        if mask[i]:
            out[f"{side}_sum"] = torch.randn(C, D, generator=g)
            out[f"{side}_count"] = torch.tensor([2.0, 0.0, 1.0])
    return out


def reply(node: int, params, n: int, loss: float = 1.0, st=None, metrics=None) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(params),
            "metrics": MetricRecord(
                metrics or {"num-examples": n, "train-loss": loss, "partition-id": node - 1}
            ),
        }
    )
    if st is not None:
        content["stats"] = ArrayRecord(st)
    return Message(
        content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    )


def reply_with_array(node: int, array: Array) -> Message:
    """A reply whose ``adapters.text_0.up.weight`` is ``array`` as sent, bytes and all."""
    msg = reply(node, theta(node), 5, st=stats(node))
    msg.content["arrays"]["adapters.text_0.up.weight"] = array
    return msg


def lying_array() -> Array:
    """Declares float32[2, 2] but carries a float32[3] .npy payload."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, dtype=np.float32), allow_pickle=False)
    return Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=buf.getvalue())


def mock_grid(nodes, send_and_receive=None) -> Mock:
    """Flower's ``Grid`` with ``nodes`` connected; ``send_and_receive`` answers messages."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(nodes)
    if send_and_receive is not None:
        grid.send_and_receive.side_effect = send_and_receive
    return grid


def bank() -> PrototypeBank:
    g = torch.Generator().manual_seed(5)
    n = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa
    return PrototypeBank(n(C, D), n(C, D), n(D), n(D))


def rcsr(num_clients=4, **opts) -> RCSRStrategy:
    s = RCSRStrategy(
        RetrievalTask(bank()),
        RoutingOptions(router_hidden=16, groups=TOWER_GROUPS, **opts),
        num_clients=num_clients,
    )
    s.current = ArrayRecord(theta(0))
    return s


def test_fedavg_mode_aggregates_exactly_like_flowers_fedavg():
    replies = [reply(1, theta(1), 10), reply(2, theta(2), 30), reply(3, theta(3), 7)]
    ours = RCSRStrategy(None, RoutingOptions(mode="fedavg"), num_clients=3)
    ours.current = ArrayRecord(theta(0))
    mine, _ = ours.aggregate_train(1, replies)
    theirs, _ = FedAvg().aggregate_train(1, replies)
    for key in theirs:
        assert mine[key].numpy().tobytes() == theirs[key].numpy().tobytes(), key


def test_rcsr_round_weights_aggregate_prototypes_and_router_step():
    s = rcsr()
    router_before = [p.detach().clone() for p in s.router.parameters()]
    bank_before = s.task.bank.image.clone()
    replies = [
        reply(1, theta(1), 10, 0.5, stats(1)),
        reply(2, theta(2), 20, 2.0, stats(2, (1.0, 0.0))),
        reply(3, theta(3), 5, 1.0, stats(3, (0.0, 1.0))),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    rec = s.history[1]
    fused = torch.tensor([rec["weights"][str(i)]["fused"] for i in range(3)])
    assert fused.sum().item() == pytest.approx(1.0, abs=1e-6)
    for kind in ("router", "minimax"):
        assert sum(rec["weights"][str(i)][kind] for i in range(3)) == pytest.approx(1, abs=1e-6)
    # step 5: θ + Σ w_k Δ_k
    expected = {k: sum(fused[i] * theta(i + 1)[k] for i in range(3)) for k in theta(0)}
    for k, v in expected.items():
        assert torch.allclose(torch.from_numpy(arrays[k].numpy()), v, atol=1e-6)
    assert not torch.equal(s.task.bank.image, bank_before)  # step 6
    assert any(
        not torch.equal(a, b) for a, b in zip(router_before, s.router.parameters(), strict=True)
    )  # step 7
    assert rec["router_loss"] is not None and rec["weight_entropy"] > 0  # step 8
    assert rec["skipped"] is False and metrics["num-clients"] == 3
    # minimax: client 1 (partition 1) had the highest loss -> the largest minimax weight
    assert max(range(3), key=lambda i: rec["weights"][str(i)]["minimax"]) == 1


def test_lost_and_silent_nodes_are_recorded_under_their_own_ids():
    """The SuperLink answers for a node it lost with an error from its own id; the
    round's record names the node the message went to, and the nodes that sent nothing."""
    s = rcsr()
    sent = []
    for node in (1, 2, 3, 4, 5):
        msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = f"m{node}"  # what the grid's push does
        sent.append(msg)
    replies = [
        Message(reply(n, theta(n), 10, st=stats(n)).content, reply_to=sent[n - 1]) for n in (1, 2)
    ]
    for lost in sent[2:4]:  # two lost nodes: the same sender, two records
        err = Message(Error(code=5, reason="Error: Node Unavailable."), reply_to=lost)
        err.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id
        replies.append(err)
    s.in_flight = (sent, 30.0)
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None and s.in_flight is None
    assert s.history[1]["dropped"] == {
        "3": "error reply: Error: Node Unavailable.",
        "4": "error reply: Error: Node Unavailable.",
        "5": "no reply within 30 s",
    }


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            lambda: Message(
                Error(code=1, reason="boom"),
                reply_to=Message(RecordDict(), dst_node_id=9, message_type=MessageType.TRAIN),
            ),
            "error reply: boom",
        ),
        (lambda: reply(9, theta(9), 5, st=None), "missing ArrayRecord 'stats'"),
        (
            lambda: reply(
                9, {**theta(9), "adapters.text_0.up.weight": torch.zeros(3, 3)}, 5, st=stats(9)
            ),
            "expected float32[2, 2]",
        ),
        (
            lambda: reply(
                9,
                {**theta(9), "adapters.text_0.up.weight": torch.zeros(2, 2, dtype=torch.float64)},
                5,
                st=stats(9),
            ),
            "expected float32",
        ),
        (
            lambda: reply(
                9,
                {**theta(9), "adapters.text_0.up.weight": torch.full((2, 2), float("nan"))},
                5,
                st=stats(9),
            ),
            "non-finite",
        ),
        (
            lambda: reply(
                9, theta(9), 5, st={**stats(9), "p_image": torch.full((D,), float("inf"))}
            ),
            "'p_image' has non-finite",
        ),
        (
            lambda: reply(9, theta(9), 5, st={**stats(9), "geometry": torch.zeros(3)}),
            "'geometry' has shape",
        ),
        (
            lambda: reply(
                9, theta(9), 5, st={**stats(9), "geometry": torch.tensor([1.0, 1e8, 0.0, 0.1])}
            ),
            "tower share in [0, 1]",
        ),
        (
            lambda: reply(9, theta(9), 5, st={**stats(9, (1.0, 0.0)), "mask": torch.ones(2)}),
            "mask says has-text=1",
        ),
        (
            lambda: reply(
                9, theta(9), 5, st=stats(9), metrics={"num-examples": 5, "train-loss": 1.0}
            ),
            "no 'partition-id'",
        ),
        (
            lambda: reply(
                9,
                theta(9),
                5,
                st=stats(9),
                metrics={"num-examples": 5, "train-loss": float("nan"), "partition-id": 0},
            ),
            "train-loss",
        ),
        (lambda: reply(9, {"other": torch.zeros(1)}, 5, st=stats(9)), "keys differ"),
        (
            lambda: reply(
                9,
                theta(9),
                5,
                st=stats(9),
                metrics={"num-examples": 5, "train-loss": [1.0, 2.0], "partition-id": 8},
            ),
            "train-loss is [1.0, 2.0]",
        ),
        (
            lambda: reply(
                9,
                theta(9),
                5,
                st=stats(9),
                metrics={"num-examples": 5, "train-loss": 1.0, "partition-id": 10},
            ),
            "partition-id is 10, expected an int in [0, 10)",
        ),
        (
            lambda: reply(
                9,
                theta(9),
                5,
                st=stats(9),
                metrics={"num-examples": 5, "train-loss": 1.0, "partition-id": 1},
            ),
            "partition-id 1 already replied",
        ),
        (lambda: reply_with_array(9, lying_array()), "declares float32[2, 2]"),
        (
            lambda: reply(
                9,
                theta(9),
                5,
                st=stats(9),
                metrics={"num-examples": 5.0, "train-loss": 1.0, "partition-id": 8},
            ),
            "num-examples is 5.0 (float), expected an int",
        ),
    ],
)
def test_malformed_replies_are_dropped_with_a_reason(bad, reason, caplog):
    s = rcsr(num_clients=10)
    good = [reply(1, theta(1), 10, 0.5, stats(1)), reply(2, theta(2), 20, 1.0, stats(2))]
    arrays, _ = s.aggregate_train(1, [*good, bad()])
    assert arrays is not None
    dropped = s.history[1]["dropped"]
    assert list(dropped) == ["9"] and reason in dropped["9"], dropped
    assert "node 9" in caplog.text and reason in caplog.text
    assert set(s.history[1]["weights"]) == {"0", "1"}


class WritesAFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def test_a_pickled_payload_is_dropped_and_never_unpickled(tmp_path, caplog):
    sentinel = tmp_path / "pwned"
    payload = np.empty((2, 2), dtype=object)
    payload[0, 0] = WritesAFileWhenUnpickled(sentinel)
    buf = io.BytesIO()
    np.save(buf, payload, allow_pickle=True)
    assert b"pwned" in buf.getvalue()  # the bytes really are a pickle that would run
    evil = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=buf.getvalue())
    s = rcsr(num_clients=10)
    good = [reply(1, theta(1), 10, 0.5, stats(1)), reply(2, theta(2), 20, 1.0, stats(2))]
    arrays, _ = s.aggregate_train(1, [*good, reply_with_array(9, evil)])
    assert arrays is not None and not sentinel.exists()
    assert "does not decode as a plain array" in s.history[1]["dropped"]["9"]
    pickle.loads(pickle.dumps(WritesAFileWhenUnpickled(sentinel)))  # the payload is live:
    assert sentinel.read_text() == "unpickled"  # unpickling it writes the file


def test_updates_above_max_update_norm_are_dropped_and_the_round_goes_on(caplog):
    s = rcsr(max_update_norm=5.0)
    base = theta(0)
    small = {k: v + 0.1 for k, v in base.items()}  # ‖Δ‖ = 0.1·√10 ≈ 0.32
    large = {k: v + 10.0 for k, v in base.items()}  # ‖Δ‖ = 10·√10 ≈ 31.6
    arrays, _ = s.aggregate_train(
        1,
        [
            reply(1, small, 10, 0.5, stats(1)),
            reply(2, large, 10, 0.5, stats(2)),
            reply(3, small, 10, 0.5, stats(3)),
        ],
    )
    assert arrays is not None and set(s.history[1]["weights"]) == {"0", "2"}
    reason = s.history[1]["dropped"]["2"]
    assert reason == "update norm 31.62 exceeds max-update-norm 5"
    assert "node 2" in caplog.text and reason in caplog.text
    for k in base:  # both survivors sent the same update, so that is the new global state
        assert torch.allclose(torch.from_numpy(arrays[k].numpy()), small[k], atol=1e-6)
    off = rcsr()  # max-update-norm = 0: no bound
    off.aggregate_train(1, [reply(1, large, 10, 0.5, stats(1))])
    assert off.history[1]["skipped"] is False and not off.history[1]["dropped"]


def test_too_few_valid_replies_skip_the_round_and_keep_the_global_state():
    s = rcsr(min_valid_replies=2)
    bank_before = s.task.bank.image.clone()
    q_before = s.minimax.q.copy()
    arrays, metrics = s.aggregate_train(
        3, [reply(1, theta(1), 10, 0.5, stats(1)), reply(2, theta(2), 10, 0.5, st=None)]
    )
    assert arrays is None and metrics is None
    assert s.history[3]["skipped"] is True
    assert torch.equal(s.task.bank.image, bank_before) and (s.minimax.q == q_before).all()


def test_ablations_router_and_minimax_off_reduce_to_sample_weights():
    s = rcsr(router=False, minimax=False)
    assert s.router is None and s.minimax is None
    replies = [reply(1, theta(1), 10, 0.5, stats(1)), reply(2, theta(2), 30, 1.0, stats(2))]
    s.aggregate_train(1, replies)
    w = s.history[1]["weights"]
    assert w["0"]["fused"] == pytest.approx(0.25) and w["1"]["fused"] == pytest.approx(0.75)
    assert s.history[1]["router_loss"] is None


def test_configure_train_ships_adapters_prototypes_and_round_config():
    s = RCSRStrategy(
        RetrievalTask(bank()),
        RoutingOptions(
            router_hidden=16, lr_schedule=lambda r: 0.5 / r, client_config={"anchoring": True}
        ),
        num_clients=4,
        fraction_train=0.5,
        min_train_nodes=2,
        min_available_nodes=2,
    )
    grid = mock_grid([11, 12, 13, 14])
    msgs = list(s.configure_train(2, ArrayRecord(theta(0)), ConfigRecord({}), grid))
    assert len(msgs) == 2
    content = msgs[0].content
    assert set(content.array_records) == {"arrays", "prototypes"}
    cfg = content["config"]
    assert cfg["lr"] == pytest.approx(0.25) and cfg["server-round"] == 2 and cfg["anchoring"]
    assert set(content["prototypes"]) == {"image", "text", "g_image", "g_text"}


def test_personalized_summary_mean_std_worst_and_groups():
    rows = [
        ("paired", {"rsum": 300.0}),
        ("image-only", {"rsum": 100.0}),
        ("text-only", {"rsum": 200.0}),
    ]
    full = [
        (
            m,
            {
                k: v["rsum"]
                for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
            },
        )
        for m, v in rows
    ]
    out = personalized_summary(full)
    assert out["mean"]["rsum"] == pytest.approx(200.0)
    assert out["std"]["rsum"] == pytest.approx((20000 / 3) ** 0.5)
    assert out["worst10"]["rsum"] == 100.0  # ceil(10% of 3) = 1 client
    assert out["by_group"]["image-only"]["mean"]["rsum"] == 100.0
    assert set(out["by_group"]) == {"paired", "image-only", "text-only"}


def test_the_routing_core_runs_a_task_that_is_not_retrieval():
    """docs/extending.md's minimal task: the strategy needs only the RoutedTask protocol."""

    class LossRoutedTask:
        token_dim = 2

        def parse_reply(self, content):
            return None

        def token(self, report, update):
            norm = torch.sqrt(sum((u.float() ** 2).sum() for u in update.values()))
            return torch.stack([torch.tensor(report.loss), norm])

        def router_objective(self, w, reports):
            return (w * torch.tensor([r.loss for r in reports])).sum()

        def update_state(self, weights, reports):
            self.seen = weights.tolist()

        def state_records(self):
            return {}

        def state_tensors(self):
            return {}

        def load_state_tensors(self, tensors):
            pass

    task = LossRoutedTask()
    s = RCSRStrategy(task, RoutingOptions(router_hidden=8, router_heads=2), num_clients=3)
    s.current = ArrayRecord(theta(0))
    arrays, _ = s.aggregate_train(1, [reply(1, theta(1), 10, 0.5), reply(2, theta(2), 10, 3.0)])
    assert arrays is not None and sum(task.seen) == pytest.approx(1.0, abs=1e-6)


def test_partition_ordered_grid_makes_seeded_sampling_pick_the_same_partitions():
    import random

    from rcsr_flower.server.grid import PartitionOrderedGrid

    def sampled_partitions(node_of_partition: dict[int, int]) -> list[int]:
        grid = mock_grid(reversed(node_of_partition.values()))
        ordered = PartitionOrderedGrid(grid, {n: p for p, n in node_of_partition.items()})
        random.seed(7)
        partition_of = {n: p for p, n in node_of_partition.items()}
        return [partition_of[n] for n in random.sample(ordered.get_node_ids(), 3)]

    # the same partitions under two launches' random node ids
    first = sampled_partitions({0: 9001, 1: 17, 2: 4242, 3: 5, 4: 77, 5: 123456})
    second = sampled_partitions({0: 3, 1: 999, 2: 12, 3: 88888, 4: 41, 5: 7})
    assert first == second
    grid = mock_grid([30, 10, 20, 40])
    ordered = PartitionOrderedGrid(grid, {30: 0, 10: 2, 20: 1})
    assert ordered.get_node_ids() == [30, 20, 10, 40]  # unknown nodes last
    assert ordered.push_messages is grid.push_messages  # the rest is delegated


def test_a_resumed_start_runs_the_remaining_rounds_with_their_true_numbers():
    s = RCSRStrategy(
        RetrievalTask(bank()),
        RoutingOptions(router_hidden=16, lr_schedule=lambda r: r / 100),
        num_clients=3,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=2,
        min_available_nodes=2,
    )
    sent = []

    def send_and_receive(messages, timeout=None):
        messages = list(messages)
        sent.extend(
            (m.content["config"]["server-round"], m.content["config"]["lr"]) for m in messages
        )
        return [
            reply(m.metadata.dst_node_id, theta(m.metadata.dst_node_id), 10, 1.0, stats(1))
            for m in messages
        ]

    grid = mock_grid([1, 2], send_and_receive)
    evaluated, ended = [], []
    result = s.start(
        grid,
        ArrayRecord(theta(0)),
        num_rounds=4,
        evaluate_fn=lambda r, a: evaluated.append(r),
        first_round=3,
        on_round_end=lambda r, a: ended.append(r),
    )
    assert sorted(set(sent)) == [(3, 0.03), (4, 0.04)]  # no round 1 or 2, true lr
    assert evaluated == [3, 4] and ended == [3, 4]  # no second zero-shot row
    assert sorted(s.history) == [3, 4] and result.arrays is not None
    fresh = []
    s.start(grid, ArrayRecord(theta(0)), num_rounds=1, on_round_end=lambda r, a: fresh.append(r))
    assert fresh == [0, 1]  # a fresh run checkpoints its zero-shot state too
    # resumed from its round-0 checkpoint: round 1 next, round 0 not evaluated again
    evaluated, ended = [], []
    s.start(
        grid,
        ArrayRecord(theta(0)),
        num_rounds=1,
        evaluate_fn=lambda r, a: evaluated.append(r),
        on_round_end=lambda r, a: ended.append(r),
        first_round=1,
        fresh=False,
    )
    assert evaluated == [1] and ended == [1]


# ------------------------------------------------------------------ §5 (ours, revised)
def modality_reply(node: int, params, n: int, modality: int, loss: float = 1.0, st=None):
    metrics = {"num-examples": n, "train-loss": loss, "partition-id": node - 1}
    return reply(node, params, n, loss, st, metrics={**metrics, "modality": modality})


def image_only_theta(seed: int) -> dict[str, torch.Tensor]:
    """An image-only client's θ_k: its text tower never trains, so Δ_text is exactly 0."""
    return {**theta(seed), "adapters.text_0.up.weight": theta(0)["adapters.text_0.up.weight"]}


def fedavg(tower_aggregation: bool) -> RCSRStrategy:
    s = RCSRStrategy(
        None,
        RoutingOptions(mode="fedavg", tower_aggregation=tower_aggregation, groups=TOWER_GROUPS),
        num_clients=4,
    )
    s.current = ArrayRecord(theta(0))
    return s


def test_naive_fedavg_stays_flowers_fedavg_with_unimodal_clients():
    replies = [
        modality_reply(1, theta(1), 10, 0),
        modality_reply(2, image_only_theta(2), 30, 1),
        modality_reply(3, theta(3), 7, 0),
    ]
    mine, _ = fedavg(tower_aggregation=False).aggregate_train(1, replies)
    theirs, _ = FedAvg().aggregate_train(1, replies)
    for key in theirs:
        assert mine[key].numpy().tobytes() == theirs[key].numpy().tobytes(), key


def test_tower_aggregation_is_plain_aggregation_when_every_client_is_paired():
    replies = [modality_reply(n, theta(n), 5 * n, 0, st=stats(n)) for n in (1, 2, 3)]
    tower, _ = fedavg(True).aggregate_train(1, replies)
    plain, _ = fedavg(False).aggregate_train(1, replies)
    routed, _ = rcsr().aggregate_train(1, replies)
    routed_plain, _ = rcsr(tower_aggregation=False).aggregate_train(1, replies)
    for key in theta(0):
        assert tower[key].numpy().tobytes() == plain[key].numpy().tobytes(), key
        assert routed[key].numpy().tobytes() == routed_plain[key].numpy().tobytes(), key


def test_a_server_lr_below_one_moves_theta_that_fraction_of_the_way_to_the_average():
    replies = [modality_reply(n, theta(n), 5 * n, 0, st=stats(n)) for n in (1, 2, 3)]
    full, _ = fedavg(True).aggregate_train(1, replies)
    half = fedavg(True)
    half.options.server_lr = 0.5
    stepped, _ = half.aggregate_train(1, replies)
    routed_step, _ = rcsr(router=False, server_lr=0.25).aggregate_train(1, replies)
    routed_full, _ = rcsr(router=False).aggregate_train(1, replies)
    for key, start in theta(0).items():
        start = start.numpy()
        expected = start + 0.5 * (full[key].numpy() - start)
        assert stepped[key].numpy().dtype == full[key].numpy().dtype
        assert np.allclose(stepped[key].numpy(), expected, rtol=0, atol=1e-7), key
        expected = start + 0.25 * (routed_full[key].numpy() - start)
        assert np.allclose(routed_step[key].numpy(), expected, rtol=0, atol=1e-7), key
        assert not np.allclose(stepped[key].numpy(), full[key].numpy()), key  # it moved less


def test_a_zero_text_update_of_an_image_only_client_does_not_slow_the_text_tower():
    paired = [modality_reply(1, theta(1), 10, 0), modality_reply(3, theta(3), 7, 0)]
    image_only = modality_reply(2, image_only_theta(2), 30, 1)
    mine, _ = fedavg(True).aggregate_train(1, [paired[0], image_only, paired[1]])
    everyone, _ = FedAvg().aggregate_train(1, [paired[0], image_only, paired[1]])
    absent, _ = FedAvg().aggregate_train(1, paired)
    text, vision = "adapters.text_0.up.weight", "adapters.vision_0.up.weight"
    # the text tower moves as if the image-only client were absent ...
    assert mine[text].numpy().tobytes() == absent[text].numpy().tobytes()
    # ... while it still counts, with its full weight, for the tower it trained
    assert mine[vision].numpy().tobytes() == everyone[vision].numpy().tobytes()
    # the naive form dilutes the text update by the client's weight (30 of 47 examples)
    step = everyone[text].numpy() - theta(0)[text].numpy()
    full = absent[text].numpy() - theta(0)[text].numpy()
    assert np.allclose(step, full * 17 / 47, atol=1e-6)


def test_a_tower_no_participant_holds_stays_as_it_is():
    replies = [modality_reply(n, image_only_theta(n), 10, 1) for n in (1, 2)]
    arrays, _ = fedavg(True).aggregate_train(1, replies)
    text = "adapters.text_0.up.weight"
    assert arrays[text].numpy().tobytes() == ArrayRecord(theta(0))[text].numpy().tobytes()


def test_each_round_records_where_every_update_pointed():
    """The diagnosis of what unimodal clients do: per client and tower it holds, the
    update's norm, its cosine with the aggregate update and with the other paired
    clients' mean update; a missing tower is not reported. The record changes nothing."""
    paired = [modality_reply(1, theta(1), 10, 0), modality_reply(3, theta(3), 7, 0)]
    image_only = modality_reply(2, image_only_theta(2), 30, 1)
    s = fedavg(True)
    arrays, _ = s.aggregate_train(1, [paired[0], image_only, paired[1]])
    geometry = s.history[1]["updates"]
    # client ids follow the partition-id the replies carry; the image-only one is 1
    assert set(geometry["1"]) == {"vision"} and set(geometry["0"]) == {"vision", "text"}
    base = ArrayRecord(theta(0)).to_torch_state_dict()

    def flat(state, tower):
        return torch.cat(
            [(state[k] - base[k]).double().flatten() for k in base if f".{tower}_" in k]
        )

    mine = flat(ArrayRecord(image_only_theta(2)).to_torch_state_dict(), "vision")
    others = torch.stack(
        [flat(ArrayRecord(theta(n)).to_torch_state_dict(), "vision") for n in (1, 3)]
    ).mean(0)
    agg = flat(arrays.to_torch_state_dict(), "vision")
    got = geometry["1"]["vision"]
    assert got["norm"] == pytest.approx(float(mine.norm()))
    assert got["cos_paired"] == pytest.approx(float(mine @ others / mine.norm() / others.norm()))
    assert got["cos_aggregate"] == pytest.approx(float(mine @ agg / mine.norm() / agg.norm()))
    plain, _ = fedavg(True).aggregate_train(1, [paired[0], image_only, paired[1]])
    for key in arrays:
        assert arrays[key].numpy().tobytes() == plain[key].numpy().tobytes()


def test_paired_only_aggregation_leaves_unimodal_clients_out_of_the_average():
    """``aggregate-unimodal = false`` (the ``fedavg-paired`` baseline): FedAvg over the
    paired clients only, bit for bit; a round with no paired reply keeps θ."""
    paired = [modality_reply(1, theta(1), 10, 0), modality_reply(3, theta(3), 7, 0)]
    image_only = modality_reply(2, image_only_theta(2), 30, 1)
    options = RoutingOptions(mode="fedavg", aggregate_unimodal=False, groups=TOWER_GROUPS)
    s = RCSRStrategy(None, options, num_clients=4)
    s.current = ArrayRecord(theta(0))
    mine, metrics = s.aggregate_train(1, [paired[0], image_only, paired[1]])
    absent, _ = FedAvg().aggregate_train(1, paired)
    for key in absent:
        assert mine[key].numpy().tobytes() == absent[key].numpy().tobytes(), key
    assert metrics["num-clients"] == 2 and s.history[1]["left_out"] == [1]
    assert s.aggregate_train(2, [image_only]) == (None, None)
    assert s.history[2]["skipped"] is True


def test_aggregation_weights_come_from_an_eval_mode_router_and_repeat():
    s = rcsr(num_clients=4, router_dropout=0.5)
    replies = [
        reply(1, theta(1), 10, 0.5, stats(1)),
        reply(2, theta(2), 20, 2.0, stats(2, (1.0, 0.0))),
        reply(3, theta(3), 5, 1.0, stats(3, (0.0, 1.0))),
    ]
    from rcsr_flower.routing.aggregation import updates_of, validate_replies

    reports, _ = validate_replies(replies, s.current, s.task)
    tokens = s._tokens(reports, updates_of(reports, s.current))
    first, second = s._router_weights(reports, tokens), s._router_weights(reports, tokens)
    assert torch.equal(first, second)
    with torch.no_grad():
        noisy = s.router.train()(tokens)
    assert not torch.allclose(noisy, first)
    s.aggregate_train(1, replies)
    rec = s.history[1]["weights"]
    recorded = torch.tensor([rec[str(i)]["router"] for i in range(3)])
    assert torch.allclose(recorded, first, atol=1e-7)  # the router before its own step


def test_fused_weights_are_router_times_minimax_and_move_the_bank():
    s = rcsr()
    twin = bank()
    replies = [
        reply(1, theta(1), 10, 0.5, stats(1)),
        reply(2, theta(2), 20, 2.0, stats(2, (1.0, 0.0))),
        reply(3, theta(3), 5, 1.0, stats(3, (0.0, 1.0))),
    ]
    s.aggregate_train(1, replies)
    rec = s.history[1]["weights"]
    w = {kind: torch.tensor([rec[str(i)][kind] for i in range(3)]) for kind in rec["0"]}
    product = w["router"] * w["minimax"]
    assert torch.allclose(w["fused"], product / product.sum(), atol=1e-7)
    # step 6 used the fused weights: the same update on a twin bank gives the same bank
    from rcsr_flower.routing.aggregation import validate_replies

    reports, _ = validate_replies(replies, ArrayRecord(theta(0)), RetrievalTask(twin))
    RetrievalTask(twin).update_state(w["fused"], reports)
    assert torch.allclose(s.task.bank.image, twin.image, atol=1e-6)
    assert torch.allclose(s.task.bank.g_text, twin.g_text, atol=1e-6)
    other = bank()
    RetrievalTask(other).update_state(w["router"], reports)  # not the router's alone
    assert not torch.allclose(s.task.bank.image, other.image, atol=1e-6)


def test_a_fresh_start_evaluates_every_client_at_round_zero_before_training(tmp_path):
    from rcsr_flower.retrieval.metrics import RECALL_KEYS
    from rcsr_flower.routing.outputs import MetricsLog

    metrics_log = MetricsLog(tmp_path / "metrics.jsonl")
    s = RCSRStrategy(
        None,
        RoutingOptions(mode="fedavg"),
        num_clients=2,
        metrics_log=metrics_log,
        evaluation=PersonalizedRetrieval(),
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=2,
        min_evaluate_nodes=2,
        min_available_nodes=2,
    )
    calls = []

    def send_and_receive(messages, timeout=None):
        out = []
        for m in messages:
            node, cfg = m.metadata.dst_node_id, m.content["config"]
            calls.append((m.metadata.message_type, cfg["server-round"]))
            if m.metadata.message_type == MessageType.EVALUATE:
                metrics = {k: float(node) for k in (*RECALL_KEYS, "rsum")}
                metrics["evaluate-seconds"] = 0.125
                content = RecordDict(
                    {"metrics": MetricRecord({**metrics, "modality": 0, "partition-id": node - 1})}
                )
                out.append(Message(content, reply_to=m))
            else:
                metrics = {"num-examples": 10, "train-loss": 1.0, "partition-id": node - 1}
                timed = {**metrics, "train-seconds": 1.25}
                out.append(Message(reply(node, theta(node), 10, metrics=timed).content, reply_to=m))
        return out

    grid = mock_grid([1, 2], send_and_receive)
    s.start(grid, ArrayRecord(theta(0)), num_rounds=1)
    assert calls[:2] == [(MessageType.EVALUATE, 0)] * 2  # zero-shot, before any training
    assert calls[2:4] == [(MessageType.TRAIN, 1)] * 2
    rows = {r["round"]: r for r in s.metrics_log.rows}
    assert rows[0]["personalized"]["mean"]["rsum"] == pytest.approx(1.5)
    # the strategy writes every round's row itself, with where the time went
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").open()] == [0, 1]
    assert set(rows[0]["seconds"]) == {"round", "federated_evaluate", "clients"}  # no central
    phases = rows[1]["seconds"]
    assert set(phases) == {
        "round",
        "train_wait",
        "aggregate",
        "router_step",
        "federated_evaluate",
        "clients",
    }
    assert phases["clients"] == {"train": 2.5, "evaluate": 0.25}  # 2 nodes
    assert phases["round"] >= phases["train_wait"] + phases["federated_evaluate"] >= 0


def test_the_central_evaluation_runs_while_the_clients_evaluate(tmp_path):
    """``evaluate_fn`` runs in a thread beside the federated evaluation of the same
    arrays: here it can only finish once the clients were asked to evaluate (run one
    after the other, it would wait in vain), and the clients can only answer once it
    started. Its draws from ``random`` come after the sampling: the same nodes are
    sampled as without it. Its error reaches the caller."""
    import random
    import threading

    from rcsr_flower.routing.outputs import MetricsLog

    def strategy() -> RCSRStrategy:
        return RCSRStrategy(
            None,
            RoutingOptions(mode="fedavg"),
            num_clients=4,
            metrics_log=MetricsLog(tmp_path / "metrics.jsonl"),
            fraction_train=0.5,
            fraction_evaluate=0.5,
            min_train_nodes=2,
            min_evaluate_nodes=2,
            min_available_nodes=2,
        )

    asked, started = threading.Event(), threading.Event()
    evaluated_by = []

    def send_and_receive(messages, timeout=None):
        messages = list(messages)
        if messages[0].metadata.message_type == MessageType.EVALUATE:
            evaluated_by.append(sorted(m.metadata.dst_node_id for m in messages))
            asked.set()
            assert started.wait(30), "the central evaluation did not start beside the clients"
            return [evaluate_reply(m.metadata.dst_node_id, {"rsum": 1.0}) for m in messages]
        return [reply(m.metadata.dst_node_id, theta(1), 10) for m in messages]

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started.set()
        random.random()  # a draw from the global RNG the node sampling uses
        assert asked.wait(30), "the clients were not asked while the server evaluated"
        asked.clear()
        return MetricRecord({"rsum": float(server_round)})

    result = strategy().start(
        mock_grid([1, 2, 3, 4], send_and_receive),
        ArrayRecord(theta(0)),
        num_rounds=2,
        evaluate_fn=central,
    )
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert result.evaluate_metrics_serverapp[2]["rsum"] == 2.0
    with_central = list(evaluated_by)
    evaluated_by.clear()
    started.set()  # clients need not wait without a central evaluation
    strategy().start(mock_grid([1, 2, 3, 4], send_and_receive), ArrayRecord(theta(0)), num_rounds=2)
    assert evaluated_by == with_central  # the thread's draw moved no node sample

    def broken(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        raise ValueError("the test split is gone")

    with pytest.raises(ValueError, match="test split is gone"):
        strategy().start(
            mock_grid([1, 2, 3, 4], send_and_receive),
            ArrayRecord(theta(0)),
            num_rounds=1,
            evaluate_fn=broken,
        )


def test_eval_every_spaces_federated_and_central_evaluation_alike(tmp_path):
    """``evaluate_every = 2`` over 5 rounds: clients and server evaluate at rounds 0, 2,
    4 and the last (5), and no others; every round trains, on the same nodes as with
    evaluation every round. ``evaluate_every = 0``: round 0 and the last only."""
    from rcsr_flower.routing.outputs import MetricsLog

    def run(every: int) -> tuple[list, list, list, dict]:
        evaluated, trained, central = [], [], []

        def send_and_receive(messages, timeout=None):
            messages = list(messages)
            rnd = messages[0].content["config"]["server-round"]
            nodes = sorted(m.metadata.dst_node_id for m in messages)
            if messages[0].metadata.message_type == MessageType.EVALUATE:
                evaluated.append(rnd)
                return [evaluate_reply(n, {"num-examples": 5, "rsum": 1.0}) for n in nodes]
            trained.append((rnd, nodes))
            return [reply(n, theta(n), 10) for n in nodes]

        def central_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            central.append(server_round)
            return MetricRecord({"rsum": 1.0})

        s = RCSRStrategy(
            None,
            RoutingOptions(mode="fedavg", seed=3),
            num_clients=4,
            metrics_log=MetricsLog(tmp_path / f"metrics-{every}.jsonl"),
            evaluate_every=every,
            fraction_train=0.5,
            min_train_nodes=2,
            min_evaluate_nodes=2,
            min_available_nodes=2,
        )
        s.start(
            mock_grid([1, 2, 3, 4], send_and_receive),
            ArrayRecord(theta(0)),
            num_rounds=5,
            evaluate_fn=central_fn,
        )
        rows = {r["round"]: r for r in s.metrics_log.rows}
        return evaluated, central, trained, rows

    evaluated, central, trained, rows = run(2)
    assert evaluated == central == [0, 2, 4, 5]
    assert [r for r, _ in trained] == [1, 2, 3, 4, 5]
    assert "evaluation" not in rows[3] and "federated_evaluate" not in rows[3]["seconds"]
    assert "evaluation" in rows[4] and "train_wait" in rows[3]["seconds"]
    every_round = run(1)
    assert every_round[0] == every_round[1] == [0, 1, 2, 3, 4, 5]
    assert every_round[2] == trained  # skipping an evaluation moves no training sample
    assert run(0)[0] == [0, 5]
    with pytest.raises(ValueError, match="evaluate_every = -1"):
        RCSRStrategy(None, RoutingOptions(mode="fedavg"), num_clients=4, evaluate_every=-1)


def evaluate_reply(node: int, metrics: dict) -> Message:
    return Message(
        RecordDict({"metrics": MetricRecord(metrics)}),
        reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE),
    )


def test_federated_evaluation_defaults_to_flowers_weighted_average(tmp_path, caplog):
    from rcsr_flower.routing.outputs import MetricsLog

    caplog.set_level("INFO", logger="rcsr_flower.routing.strategy")
    log = MetricsLog(tmp_path / "metrics.jsonl")
    s = RCSRStrategy(None, RoutingOptions(mode="fedavg"), num_clients=3, metrics_log=log)
    replies = [
        evaluate_reply(1, {"num-examples": 10, "accuracy": 0.5, "loss": 2.0, "partition-id": 0}),
        evaluate_reply(2, {"num-examples": 30, "accuracy": 0.9, "loss": 1.0, "partition-id": 1}),
        evaluate_reply(3, {"num-examples": 2.5, "accuracy": 1.0, "partition-id": 2}),
        evaluate_reply(4, {"num-examples": 0, "accuracy": 1.0, "partition-id": 3}),
    ]
    record = s.aggregate_evaluate(1, replies)
    assert record["evaluation-accuracy"] == pytest.approx((5 + 27) / 40)
    assert record["evaluation-loss"] == pytest.approx((20 + 30) / 40)
    assert "evaluation-partition-id" not in record
    assert log.pending[1]["evaluation"]["clients"] == 2
    assert "dropping reply from node 3: num-examples is 2.5" in caplog.text
    assert "node 4 had nothing to evaluate" in caplog.text


def test_a_retrieval_evaluation_reply_without_its_modality_is_dropped_not_a_crash(caplog):
    from rcsr_flower.retrieval.metrics import RECALL_KEYS

    s = RCSRStrategy(
        None, RoutingOptions(mode="fedavg"), num_clients=2, evaluation=PersonalizedRetrieval()
    )
    recall = {k: 50.0 for k in (*RECALL_KEYS, "rsum")}
    good = evaluate_reply(1, {**recall, "modality": 1, "partition-id": 0})
    bad = evaluate_reply(2, {**recall, "partition-id": 1})
    record = s.aggregate_evaluate(1, [good, bad])
    assert record["personalized-rsum"] == 50.0
    assert "dropping reply from node 2: evaluation metrics lack ['modality']" in caplog.text


def test_a_run_whose_every_round_is_skipped_fails_with_the_reasons():
    s = RCSRStrategy(
        None,
        RoutingOptions(mode="fedavg", min_valid_replies=2),
        num_clients=2,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=2,
        min_available_nodes=2,
    )

    def send_and_receive(messages, timeout=None):
        metrics = {"num-examples": 0, "train-loss": 1.0, "partition-id": 0}
        return [
            Message(reply(1, theta(1), 0, metrics=metrics).content, reply_to=m) for m in messages
        ]

    grid = mock_grid([1, 2], send_and_receive)
    with pytest.raises(RuntimeError, match=r"every round \(1\.\.2\) was skipped") as err:
        s.start(grid, ArrayRecord(theta(0)), num_rounds=2)
    assert "num-examples is 0: nothing trained" in str(err.value)
