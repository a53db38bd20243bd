"""The pure steps of a server round (§5 steps 1 and 5): which messages went
unanswered, which replies are well-formed enough to use, the clients' updates, and the
(tower-wise) weighted average. No strategy state: ``RCSRStrategy`` calls them, and tests
and other strategies can use them on their own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from rcsr_flower.routing.task import ClientReport, ParameterGroups, ReplyError, RoutedTask

log = logging.getLogger(__name__)


def _no_group(key: str) -> str | None:
    return None


def unanswered(messages: list[Message], replies: list[Message]) -> list[tuple[Message, str | None]]:
    """``(message, error)`` for each sent message without a good reply: ``error`` is None
    when none came (timeout), else the error reply's reason.

    An error the SuperLink makes for a node it lost (``NODE_UNAVAILABLE``) comes from the
    SuperLink's own id, so replies are matched by ``reply_to_message_id``, not sender.
    """
    reply_to = {r.metadata.reply_to_message_id: r for r in replies}
    out = []
    for msg in messages:
        reply = reply_to.get(msg.metadata.message_id)
        if reply is None:
            out.append((msg, None))
        elif reply.has_error():
            out.append((msg, reply.error.reason))
    return out


def validate_replies(
    replies: Iterable[Message],
    template: ArrayRecord,
    task: RoutedTask | None,
    min_examples: int = 1,
    max_update_norm: float = 0.0,
    num_clients: int | None = None,
    sent: Iterable[Message] = (),
    groups: ParameterGroups | None = None,
) -> tuple[list[ClientReport], list[tuple[int, str]]]:
    """Step 1: keep well-formed replies; return ``(reports, [(node, reason), ...])``.

    ``sent``, the round's messages, names the node of each reply by the message it
    answers: the SuperLink's error for a node it lost comes from the SuperLink's own id.

    Arrays are decoded without unpickling (Flower's ``np.load(allow_pickle=False)``) and
    checked against what they declare; ``max_update_norm > 0`` drops an update
    ``‖θ_k − θ‖₂`` above it; ``num_clients`` bounds ``partition-id``, which indexes the
    minimax distribution, and a partition that already replied is dropped. ``groups``
    reads which parameter groups each client trained (:class:`ParameterGroups`).
    """
    expected = {k: (tuple(a.shape), a.dtype) for k, a in template.items()}
    theta = {k: a.numpy() for k, a in template.items()} if max_update_norm > 0 else {}
    addressed = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    addressed.pop("", None)  # not pushed yet: no id to match
    reports, dropped, seen = [], [], set()
    for msg in replies:
        node = addressed.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        try:
            if msg.has_error():
                raise ReplyError(f"error reply: {last_line(msg.error.reason)}")
            content = msg.content
            if "arrays" not in content.array_records:
                raise ReplyError("missing ArrayRecord 'arrays'")
            if "metrics" not in content.metric_records:
                raise ReplyError("missing MetricRecord 'metrics'")
            arrays, metrics = content.array_records["arrays"], content.metric_records["metrics"]
            got = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
            if set(got) != set(expected):
                diff = sorted(set(got) ^ set(expected))[:3]
                raise ReplyError(f"'arrays' keys differ from the global parameters: {diff}")
            sq_norm = 0.0
            for k, (shape, dtype) in expected.items():
                if got[k] != (shape, dtype):
                    raise ReplyError(
                        f"'arrays.{k}' is {got[k][1]}{list(got[k][0])}, "
                        f"expected {dtype}{list(shape)} like the global parameters sent"
                    )
                x = _decode(arrays, k)
                if (tuple(x.shape), str(x.dtype)) != (shape, dtype):
                    raise ReplyError(
                        f"'arrays.{k}' decodes to {x.dtype}{list(x.shape)} but declares "
                        f"{dtype}{list(shape)}"
                    )
                if not np.isfinite(x).all():
                    raise ReplyError(f"'arrays.{k}' has non-finite values")
                if theta:
                    sq_norm += float(((x.astype(np.float64) - theta[k]) ** 2).sum())
            if theta and math.sqrt(sq_norm) > max_update_norm:
                raise ReplyError(
                    f"update norm {math.sqrt(sq_norm):.4g} exceeds max-update-norm "
                    f"{max_update_norm:g}"
                )
            for key in ("num-examples", "train-loss", "partition-id"):
                if key not in metrics:
                    raise ReplyError(f"'metrics' has no '{key}'")
            n, loss, pid = metrics["num-examples"], metrics["train-loss"], metrics["partition-id"]
            if not isinstance(loss, int | float) or not math.isfinite(loss):
                raise ReplyError(f"train-loss is {loss!r}")
            if not isinstance(n, int) or isinstance(n, bool):
                raise ReplyError(
                    f"num-examples is {n!r} ({type(n).__name__}), expected an int: the "
                    "number of local training examples"
                )
            if n < min_examples:
                raise ReplyError(f"num-examples is {n}: nothing trained")
            limit = num_clients if num_clients is not None else 1 << 62
            if not isinstance(pid, int) or not 0 <= pid < limit:
                raise ReplyError(f"partition-id is {pid!r}, expected an int in [0, {limit})")
            if pid in seen:
                raise ReplyError(f"partition-id {pid} already replied this round")
            holds = groups.held(metrics) if groups is not None else None
            partial = holds is not None and groups is not None and holds < groups.names
            summary = task.parse_reply(content) if task is not None else None
            report = ClientReport(node, pid, n, float(loss), arrays, summary, holds, partial)
            reports.append(report)
            seen.add(pid)
        except ReplyError as exc:
            log.warning("dropping reply from node %d: %s", node, exc)
            dropped.append((node, str(exc)))
    # replies arrive in completion order; a fixed order makes the float sums repeatable
    reports.sort(key=lambda r: (r.client_id, r.node_id))
    return reports, dropped


def last_line(reason: str, limit: int = 300) -> str:
    """A client's error as one log line: Flower's reason may carry a whole traceback
    (Ray's, in simulation), whose last line holds the exception's message."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    last = lines[-1] if lines else reason
    return last if len(last) <= limit else last[: limit - 3] + "..."


def _decode(arrays: ArrayRecord, key: str) -> np.ndarray:
    try:
        return arrays[key].numpy()  # np.load(allow_pickle=False): never unpickles
    except Exception as exc:
        raise ReplyError(f"'arrays.{key}' does not decode as a plain array: {exc}") from None


def updates_of(
    reports: list[ClientReport], global_arrays: ArrayRecord
) -> list[dict[str, torch.Tensor]]:
    """``Δ_k = θ_k − θ`` per client, as tensors."""
    theta = global_arrays.to_torch_state_dict()
    return [{k: v - theta[k] for k, v in r.arrays.to_torch_state_dict().items()} for r in reports]


def sample_weights(reports: list[ClientReport]) -> torch.Tensor:
    n = torch.tensor([float(r.num_examples) for r in reports])
    return n / n.sum()


def server_step(current: ArrayRecord, averaged: ArrayRecord, lr: float) -> ArrayRecord:
    """``θ <- θ + lr (θ̄ − θ)``: the server moves ``lr`` of the way to the average. At
    ``lr = 1`` it is the average itself (FedAvg); below 1 it shortens every round's step
    alike, whatever the clients sent, which is what zero updates do to one tower only."""
    if lr == 1.0:
        return averaged
    out = {}
    for key in averaged:
        theta = current[key].numpy()
        out[key] = Array((theta + lr * (averaged[key].numpy() - theta)).astype(theta.dtype))
    return ArrayRecord(out)


def aggregate(
    reports: list[ClientReport],
    weights: torch.Tensor | None,
    current: ArrayRecord | None = None,
    group_of: Callable[[str], str | None] = _no_group,
) -> ArrayRecord:
    """Step 5: ``θ <- Σ_k w_k θ_k / Σ_k w_k`` with Flower's own ``aggregate_arrayrecords``;
    ``weights=None`` means FedAvg's ``num-examples``.

    With ``current`` (the round's global θ) it is group-wise, by ``group_of`` (tower-wise
    in the retrieval app: §5 step 5, ours, revised): each tower ``t`` averages only over
    the clients holding it,
    ``θ_t <- θ_t + Σ_{k∈H_t} w_k Δ_k,t / Σ_{k∈H_t} w_k``, and a tower no participant holds
    stays as it is. A unimodal client's Δ is exactly zero on its missing tower; the plain
    form (``current=None``) counts that zero with the client's full weight and slows the
    tower down. With only paired clients both forms are the same computation.
    """

    def weighted_mean(members: list[int], keys: list[str]) -> ArrayRecord:
        records = [
            RecordDict(
                {
                    "arrays": ArrayRecord({k: reports[i].arrays[k] for k in keys}),
                    "metrics": MetricRecord(
                        {"w": reports[i].num_examples if weights is None else float(weights[i])}
                    ),
                }
            )
            for i in members
        ]
        return aggregate_arrayrecords(records, "w")

    everyone = list(range(len(reports)))
    keys = list(reports[0].arrays.keys())
    if current is None:
        return weighted_mean(everyone, keys)
    merged: dict = {}
    for tower in dict.fromkeys(group_of(k) for k in keys):
        tower_keys = [k for k in keys if group_of(k) == tower]
        holders = [i for i in everyone if reports[i].holds_group(tower)]
        if holders:
            merged.update(weighted_mean(holders, tower_keys).items())
        else:  # nobody trained this tower this round: it stays as it is
            merged.update((k, current[k]) for k in tower_keys)
    return ArrayRecord({k: merged[k] for k in keys})


def update_geometry(
    reports: list[ClientReport],
    current: ArrayRecord,
    merged: ArrayRecord,
    group_of: Callable[[str], str | None] = _no_group,
) -> dict[str, dict[str, dict[str, float]]]:
    """Where each client's update points, per tower it holds: its norm, its cosine with
    the round's aggregate update (``merged − current``) and with the mean update of the
    round's *other* paired clients (what clients with both modalities agree on; absent
    when no other paired client took part). Recorded each round, not used by the
    aggregation: the diagnosis of what unimodal clients' updates do to the shared model.
    """
    theta = current.to_torch_state_dict()
    new = merged.to_torch_state_dict()
    updates = updates_of(reports, current)
    keys = list(theta)
    towers = list(dict.fromkeys(group_of(k) for k in keys))

    def flat(delta: dict[str, torch.Tensor], tower: str | None) -> torch.Tensor:
        parts = [delta[k].double().flatten() for k in keys if group_of(k) == tower]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
        denom = float(a.norm() * b.norm())
        return float(a @ b) / denom if denom > 0 else None

    aggregate_update = {k: new[k] - theta[k] for k in keys}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for i, report in enumerate(reports):
        entry: dict[str, dict[str, float]] = {}
        for tower in towers:
            if not report.holds_group(tower):
                continue
            mine = flat(updates[i], tower)
            stats = {"norm": float(mine.norm())}
            if (c := cosine(mine, flat(aggregate_update, tower))) is not None:
                stats["cos_aggregate"] = c
            others = [j for j, r in enumerate(reports) if j != i and not r.partial]
            if others:
                mean = torch.stack([flat(updates[j], tower) for j in others]).mean(0)
                if (c := cosine(mine, mean)) is not None:
                    stats["cos_paired"] = c
            entry[str(tower)] = stats
        out[str(report.client_id)] = entry
    return out
