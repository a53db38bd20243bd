"""``RCSRStrategy``: retrieval-consistency routing on Flower's message-API ``FedAvg``.

Paper: *Federated Cross-Modal Retrieval with Missing Modalities via Semantic Routing and
Adapter Personalization* (RCSR, 2026). The server turns each client's prototypes, update
geometry, modality mask and loss into aggregation weights with a small router trained on
the server, fuses them with minimax fairness weights, and aggregates the adapters.

What the client must do (``client_app.py`` does it): train the shared adapters it
receives in ``"arrays"`` with the loss of SPEC §4 using the ``"prototypes"`` record and
the ``"config"`` record (``lr``, ``server-round``, the λ's, ``anchoring``, ``prox-mu``),
then reply ``"arrays"`` (its trained adapters θ_k; the server forms Δ_k = θ_k − θ),
``"metrics"`` (``num-examples``, ``train-loss``, ``partition-id``) and the task's
``"stats"`` record. ``aggregate_train`` reads as SPEC §5 steps 1–8, each a pure function.

``mode="fedavg"`` aggregates exactly like Flower's ``FedAvg`` (same function, weights
``num-examples``); ``fedprox`` adds the proximal term on the client; ``fedper`` keeps
personal adapters on the client.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from rcsr_flower.metrics import RECALL_KEYS
from rcsr_flower.outputs import MetricsLog
from rcsr_flower.routing.minimax import MinimaxWeights
from rcsr_flower.routing.router import SemanticRouter, entropy, fuse_weights
from rcsr_flower.routing.task import ClientReport, ReplyError, RoutedTask

log = logging.getLogger(__name__)

MODALITY_NAMES = ("paired", "image-only", "text-only")
SUMMARY_KEYS = (*RECALL_KEYS, "rsum")


# ============================================================================ pure steps
def validate_replies(
    replies: Iterable[Message],
    template: ArrayRecord,
    task: RoutedTask | None,
    min_examples: int = 1,
) -> tuple[list[ClientReport], list[tuple[int, str]]]:
    """Step 1: keep well-formed replies; return ``(reports, [(node, reason), ...])``."""
    expected = {k: (tuple(a.shape), a.dtype) for k, a in template.items()}
    reports, dropped = [], []
    for msg in replies:
        node = msg.metadata.src_node_id
        try:
            if msg.has_error():
                raise ReplyError(f"error reply: {msg.error.reason}")
            content = msg.content
            if "arrays" not in content.array_records:
                raise ReplyError("missing ArrayRecord 'arrays'")
            if "metrics" not in content.metric_records:
                raise ReplyError("missing MetricRecord 'metrics'")
            arrays, metrics = content.array_records["arrays"], content.metric_records["metrics"]
            got = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
            if set(got) != set(expected):
                diff = sorted(set(got) ^ set(expected))[:3]
                raise ReplyError(f"'arrays' keys differ from the global adapters: {diff}")
            for k, (shape, dtype) in expected.items():
                if got[k] != (shape, dtype):
                    raise ReplyError(
                        f"'arrays.{k}' is {got[k][1]}{list(got[k][0])}, "
                        f"expected {dtype}{list(shape)}"
                    )
                if not np.isfinite(arrays[k].numpy()).all():
                    raise ReplyError(f"'arrays.{k}' has non-finite values")
            for key in ("num-examples", "train-loss", "partition-id"):
                if key not in metrics:
                    raise ReplyError(f"'metrics' has no '{key}'")
            n, loss = metrics["num-examples"], float(metrics["train-loss"])
            if not math.isfinite(loss):
                raise ReplyError(f"train-loss is {loss}")
            if not isinstance(n, int) or n < min_examples:
                raise ReplyError(f"num-examples is {n}: nothing trained")
            summary = task.parse_reply(content) if task is not None else None
            reports.append(
                ClientReport(node, int(metrics["partition-id"]), n, loss, arrays, summary)
            )
        except ReplyError as exc:
            log.warning("dropping reply from node %d: %s", node, exc)
            dropped.append((node, str(exc)))
    # replies arrive in completion order; a fixed order makes the float sums repeatable
    reports.sort(key=lambda r: (r.client_id, r.node_id))
    return reports, dropped


def updates_of(
    reports: list[ClientReport], global_arrays: ArrayRecord
) -> list[dict[str, torch.Tensor]]:
    """``Δ_k = θ_k − θ`` per client, as tensors."""
    theta = global_arrays.to_torch_state_dict()
    return [{k: v - theta[k] for k, v in r.arrays.to_torch_state_dict().items()} for r in reports]


def sample_weights(reports: list[ClientReport]) -> torch.Tensor:
    n = torch.tensor([float(r.num_examples) for r in reports])
    return n / n.sum()


def aggregate(reports: list[ClientReport], weights: torch.Tensor | None) -> ArrayRecord:
    """Step 5: ``θ <- θ + Σ_k w_k Δ_k`` = ``Σ_k w_k θ_k`` (Σ w = 1), with Flower's own
    ``aggregate_arrayrecords``; ``weights=None`` means FedAvg's ``num-examples``."""
    records = [
        RecordDict(
            {
                "arrays": r.arrays,
                "metrics": MetricRecord(
                    {"w": r.num_examples if weights is None else float(weights[i])}
                ),
            }
        )
        for i, r in enumerate(reports)
    ]
    return aggregate_arrayrecords(records, "w")


def personalized_summary(per_client: list[tuple[str, dict[str, float]]]) -> dict:
    """SPEC §6: mean, std and worst 10% of clients (by rsum; at least one client),
    overall and per modality group."""

    def stats(rows: list[dict[str, float]]) -> dict:
        if not rows:
            return {}
        table = {k: np.array([r[k] for r in rows], dtype=float) for k in SUMMARY_KEYS}
        worst = np.argsort(table["rsum"], kind="stable")[: max(1, math.ceil(0.1 * len(rows)))]
        return {
            "mean": {k: float(v.mean()) for k, v in table.items()},
            "std": {k: float(v.std()) for k, v in table.items()},
            "worst10": {k: float(v[worst].mean()) for k, v in table.items()},
            "clients": len(rows),
        }

    out = stats([m for _, m in per_client])
    out["by_group"] = {
        name: group
        for name in MODALITY_NAMES
        if (group := stats([m for mod, m in per_client if mod == name]))
    }
    return out


# ============================================================================ strategy
@dataclass
class RoutingOptions:
    """Server-side switches and hyperparameters of SPEC §5."""

    mode: str = "rcsr"  # "rcsr" | "fedavg" | "fedprox" | "fedper"
    router: bool = True
    minimax: bool = True
    router_hidden: int = 128
    router_heads: int = 4
    router_blocks: int = 2
    router_dropout: float = 0.1
    router_lr: float = 1e-3
    minimax_eta: float = 0.1
    minimax_tau: float = 0.1
    min_valid_replies: int = 1
    seed: int = 0
    client_config: dict = field(default_factory=dict)  # static part of every train config
    lr_schedule: Callable[[int], float] | None = None

    @property
    def routed(self) -> bool:
        return self.mode == "rcsr"


class RCSRStrategy(FedAvg):
    """RCSR on Flower's message API; also FedAvg / FedProx / FedPer via ``options.mode``."""

    def __init__(
        self,
        task: RoutedTask | None,
        options: RoutingOptions,
        num_clients: int,
        metrics_log: MetricsLog | None = None,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.task = task if options.routed else None
        self.options = options
        self.metrics_log = metrics_log
        self.num_clients = num_clients
        self.current: ArrayRecord | None = None
        self.router: SemanticRouter | None = None
        self.router_opt: torch.optim.Optimizer | None = None
        self.minimax = (
            MinimaxWeights(num_clients, options.minimax_eta, options.minimax_tau)
            if options.routed and options.minimax
            else None
        )
        if self.task is not None and options.router:
            torch.manual_seed(options.seed)
            self.router = SemanticRouter(
                self.task.token_dim,
                options.router_hidden,
                options.router_heads,
                options.router_blocks,
                options.router_dropout,
            )
            self.router_opt = torch.optim.Adam(self.router.parameters(), lr=options.router_lr)
        self.history: dict[int, dict] = {}

    # ------------------------------------------------------------------ configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        config = ConfigRecord({**dict(config), **self.options.client_config})
        if self.options.lr_schedule is not None:
            config["lr"] = float(self.options.lr_schedule(server_round))
        self._seed_sampling(server_round, 0)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.task is not None:
            for msg in messages:
                for key, record in self.task.state_records().items():
                    msg.content[key] = record
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._seed_sampling(server_round, 1)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _seed_sampling(self, server_round: int, phase: int) -> None:
        """Flower samples nodes with the global ``random``, which other libraries also
        draw from: reseed it so a round's sample depends on (seed, round, phase) only."""
        random.seed(self.options.seed * 1_000_003 + server_round * 2 + phase)

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        # 1. validate
        reports, dropped = validate_replies(replies, self.current, self.task)
        record: dict = {"dropped": {str(n): why for n, why in dropped}}
        if len(reports) < max(self.options.min_valid_replies, 1):
            log.warning(
                "round %d skipped: %d valid replies (minimum %d); global adapters unchanged",
                server_round,
                len(reports),
                self.options.min_valid_replies,
            )
            self._record(server_round, {**record, "skipped": True})
            return None, None

        if self.task is None:  # FedAvg / FedProx / FedPer: Flower's sample-count weights
            arrays = aggregate(reports, None)
            w = sample_weights(reports)
            weights = {"router": w, "minimax": torch.full_like(w, 1 / len(w)), "fused": w}
            router_loss = None
        else:
            updates = updates_of(reports, self.current)
            # 2. router weights (with graph, for step 7)
            w_router = self._router_weights(reports, updates)
            # 3. minimax weights
            w_minimax = self._minimax_weights(reports)
            # 4. fuse
            w = fuse_weights(w_router.detach(), w_minimax)
            # 5. aggregate
            arrays = aggregate(reports, w)
            # 6. prototypes
            self.task.update_state(w, reports)
            # 7. router step
            router_loss = self._router_step(w_router, reports)
            weights = {"router": w_router.detach(), "minimax": w_minimax, "fused": w}

        # 8. record
        record.update(
            skipped=False,
            weights={
                str(r.client_id): {k: float(v[i]) for k, v in weights.items()}
                for i, r in enumerate(reports)
            },
            router_loss=router_loss,
            weight_entropy=float(entropy(weights["fused"])),
            train_loss=float(
                sum(r.loss * r.num_examples for r in reports) / sum(r.num_examples for r in reports)
            ),
        )
        self._record(server_round, record)
        metrics = MetricRecord({"train-loss": record["train_loss"], "num-clients": len(reports)})
        return arrays, metrics

    def _router_weights(
        self, reports: list[ClientReport], updates: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        if self.router is None:
            return sample_weights(reports)
        tokens = torch.stack([self.task.token(r, u) for r, u in zip(reports, updates, strict=True)])
        self.router.train()
        return self.router(tokens)

    def _minimax_weights(self, reports: list[ClientReport]) -> torch.Tensor:
        if self.minimax is None:
            return torch.full((len(reports),), 1.0 / len(reports))
        w = self.minimax.step([r.client_id for r in reports], [r.loss for r in reports])
        return torch.as_tensor(w, dtype=torch.float32)

    def _router_step(self, w_router: torch.Tensor, reports: list[ClientReport]) -> float | None:
        if self.router is None or self.router_opt is None:
            return None
        loss = self.task.router_objective(w_router, reports)
        self.router_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.router_opt.step()
        return float(loss.detach())

    def _record(self, server_round: int, record: dict) -> None:
        self.history[server_round] = record
        if self.metrics_log is not None:
            self.metrics_log.add(server_round, **record)

    # ------------------------------------------------------------------ evaluate
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        per_client = []
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "evaluate: node %d failed: %s", msg.metadata.src_node_id, msg.error.reason
                )
                continue
            m = msg.content.metric_records.get("metrics")
            if m is None or "rsum" not in m:
                continue  # a client with too small a local test split
            per_client.append((MODALITY_NAMES[int(m["modality"])], dict(m)))
        if not per_client:
            return None
        summary = personalized_summary(per_client)
        if self.metrics_log is not None:
            self.metrics_log.add(server_round, personalized=summary)
        return MetricRecord({f"personalized-{k}": v for k, v in summary["mean"].items()})


def make_evaluate_fn(
    num_rounds: int,
    eval_every: int,
    metrics_log: MetricsLog,
    evaluate: Callable[[ArrayRecord], dict],
) -> Callable:
    """Centralised evaluation at round 0, every ``eval-every`` rounds and the last one.

    It is the last hook of each round, so it also writes the round's record."""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        due = server_round in (0, num_rounds) or (eval_every > 0 and server_round % eval_every == 0)
        result = None
        if due:
            metrics = evaluate(arrays)
            metrics_log.add(server_round, **{"global": metrics})
            log.info("round %d global: rsum %.2f", server_round, metrics["rsum"])
            result = MetricRecord({k: float(metrics[k]) for k in SUMMARY_KEYS})
        metrics_log.flush(server_round)
        return result

    return evaluate_fn
