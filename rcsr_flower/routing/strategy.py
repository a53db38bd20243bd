"""``RCSRStrategy``: routed aggregation on Flower's message-API ``FedAvg``, for any task.

Paper: *Federated Cross-Modal Retrieval with Missing Modalities via Semantic Routing and
Adapter Personalization* (RCSR, 2026). The server turns a feature token per client into
aggregation weights with a small router trained on the server, fuses them with minimax
fairness weights, aggregates the clients' parameters with the fused weights and updates
the task's shared state. What the tokens, the router's objective and the shared state
are is the task's (a ``RoutedTask``, ``rcsr_flower.routing.task``): image–text
retrieval in ``rcsr_flower.server.retrieval_task``, label-skewed classification in
``examples/label-routing`` (docs/extending.md).

What the client must do: train the parameters it receives in ``"arrays"`` with the
``"config"`` record (``server-round``, ``lr`` when the options schedule one, and the
options' ``client_config``) and the task's state records, then reply ``"arrays"`` (its
trained parameters θ_k; the server forms Δ_k = θ_k − θ), ``"metrics"``
(``num-examples``, ``train-loss``, ``partition-id``) and the records the task's
``parse_reply`` reads. ``aggregate_train`` reads as §5 steps 1–8, each a pure
function (validation and aggregation in ``rcsr_flower.routing.aggregation``).

``mode="fedavg"`` aggregates exactly like Flower's ``FedAvg`` (same function, weights
``num-examples``); ``fedprox`` and ``fedper`` aggregate the same way (the retrieval
app's clients add the proximal term, or keep personal adapters).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log as flwr_log

from rcsr_flower.routing.aggregation import (
    aggregate,
    last_line,
    sample_weights,
    server_step,
    unanswered,
    update_geometry,
    updates_of,
    validate_replies,
)
from rcsr_flower.routing.check import check_task
from rcsr_flower.routing.minimax import MinimaxWeights
from rcsr_flower.routing.outputs import MetricsLog
from rcsr_flower.routing.router import SemanticRouter, entropy, fuse_weights
from rcsr_flower.routing.task import (
    ClientReport,
    FederatedEvaluation,
    ParameterGroups,
    ReplyError,
    RoutedTask,
    WeightedAverage,
)

log = logging.getLogger(__name__)


class RoundClock:
    """Wall seconds per phase of one round, as the server sees them."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._phases: dict[str, float] = {}
        self._lock = threading.Lock()  # the central evaluation clocks itself in its thread

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._phases[phase] = self._phases.get(phase, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict:
        total = time.perf_counter() - self.started
        return {"round": round(total, 3), **{k: round(v, 3) for k, v in self._phases.items()}}


# ============================================================================ strategy
@dataclass
class RoutingOptions:
    """Server-side switches and hyperparameters of §5 (docs/extending.md has a table)."""

    mode: str = "rcsr"  # "rcsr" routes; "fedavg" | "fedprox" | "fedper": num-examples weights
    router: bool = True  # False: sample-count weights in place of the router's
    minimax: bool = True  # False: uniform in place of the minimax weights
    tower_aggregation: bool = True  # step 5 group by group (False: Flower's plain FedAvg)
    groups: ParameterGroups | None = None  # the task's parameter groups (its towers); None: one
    aggregate_unimodal: bool = True  # False: replies of partial (unimodal) clients are left out
    server_lr: float = 1.0  # θ moves this fraction of the way to the round's average
    router_hidden: int = 128  # width of the router's token MLP and attention blocks
    router_heads: int = 4
    router_blocks: int = 2  # self-attention blocks over the round's clients
    router_dropout: float = 0.1  # in the router step's train-mode forward only
    router_lr: float = 1e-3  # Adam, one step per round
    minimax_eta: float = 0.1  # q_k <- q_k exp(eta * loss_k)
    minimax_tau: float = 0.1  # q <- q^(1 / (1 + tau))
    min_valid_replies: int = 1  # fewer valid replies: the round is skipped
    max_update_norm: float = 0.0  # drop a reply with ||theta_k - theta|| above it; 0 = no bound
    seed: int = 0  # router initialisation and Flower's node sampling
    client_config: dict = field(default_factory=dict)  # static part of every train config
    lr_schedule: Callable[[int], float] | None = None  # round -> the train config's "lr"

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
        evaluation: FederatedEvaluation | None = None,
        evaluate_every: int = 1,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if evaluate_every < 0:
            raise ValueError(
                f"evaluate_every = {evaluate_every}: use 0 (round 0 and the last round "
                "only) or a period of 1 or more rounds"
            )
        self.task = task if options.routed else None
        # evaluation (federated and central) at round 0, every `evaluate_every` rounds
        # and the last round: a 100-round run need not evaluate every client each round
        self.evaluate_every = evaluate_every
        self.num_rounds: int | None = None  # set by start()
        self.evaluation = evaluation if evaluation is not None else WeightedAverage()
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
        self._router_seconds: dict[int, float] = {}
        self._client_seconds: dict[int, dict[str, float]] = {}
        # (messages, timeout) of the train round in flight, set by start()
        self.in_flight: tuple[list[Message], float] | None = None

    # ------------------------------------------------------------------ the round loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
        fresh: bool | None = None,
    ) -> Result:
        """Flower's ``Strategy.start`` loop, made resumable.

        Flower's loop always starts at round 1 after evaluating round 0 (its log lines are
        kept, so a run reads as before). A resumed run
        starts at ``first_round`` = k+1 with the true round numbers (the lr schedule and
        the sampling seed depend on them) and ``initial_arrays`` = the checkpointed
        parameters; round 0 is evaluated only on a ``fresh`` start (default: ``first_round ==
        1``; a run resumed from its round-0 checkpoint passes ``fresh=False``). Each round runs
        Flower's steps (train, then federated evaluation with ``evaluate_fn`` beside it in a
        thread: :meth:`_evaluate`) and ends with ``on_round_end(round, arrays)`` (the
        checkpoint); round 0 too.
        """
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        self.num_rounds = num_rounds
        flwr_log(INFO, "Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        if self.task is not None:  # a task's mistakes in one line, before anyone trains
            check_task(self.task, initial_arrays)
        result = Result()
        result.arrays = initial_arrays
        arrays = initial_arrays
        if fresh is None:
            fresh = first_round == 1
        if fresh:
            clock = RoundClock()
            # §6: zero-shot on every client's local test split too, so personalised
            # curves start from the frozen backbone like the global one
            fed, central = self._evaluate(
                0, arrays, evaluate_config, grid, timeout, evaluate_fn, clock
            )
            if fed is not None:
                flwr_log(INFO, "Initial federated evaluation results: %s", fed)
                result.evaluate_metrics_clientapp[0] = fed
            if central is not None:
                flwr_log(INFO, "Initial global evaluation results: %s", central)
                result.evaluate_metrics_serverapp[0] = central
            self._end_round(0, clock)
            if on_round_end is not None:
                on_round_end(0, arrays)
        else:
            flwr_log(INFO, "Resuming after round %d", first_round - 1)
        for server_round in range(first_round, num_rounds + 1):
            flwr_log(INFO, "")
            flwr_log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            clock = RoundClock()
            with clock("train_wait"):
                messages = list(self.configure_train(server_round, arrays, train_config, grid))
                replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
            self.in_flight = (messages, timeout)  # aggregate_train names whom it lost
            with clock("aggregate"):
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                flwr_log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[server_round] = train_metrics
            fed, central = self._evaluate(
                server_round, arrays, evaluate_config, grid, timeout, evaluate_fn, clock
            )
            if fed is not None:
                flwr_log(INFO, "\t└──> Aggregated MetricRecord: %s", fed)
                result.evaluate_metrics_clientapp[server_round] = fed
            if central is not None:
                flwr_log(INFO, "Global evaluation\t└──> MetricRecord: %s", central)
                result.evaluate_metrics_serverapp[server_round] = central
            self._end_round(server_round, clock)
            if on_round_end is not None:
                on_round_end(server_round, arrays)
        flwr_log(INFO, "")
        ran = range(first_round, num_rounds + 1)
        if len(ran) and all(self.history.get(r, {}).get("skipped") for r in ran):
            reasons = sorted({why for r in ran for why in self.history[r]["dropped"].values()})
            raise RuntimeError(
                f"every round ({first_round}..{num_rounds}) was skipped for too few valid "
                f"replies, so nothing was learnt; the replies were dropped because: "
                f"{'; '.join(reasons[:3]) or 'no client answered'}"
            )
        return result

    def _end_round(self, server_round: int, clock: RoundClock) -> None:
        """Write the round's row: what the hooks recorded plus where its time went."""
        seconds = clock.seconds()
        if "aggregate" in seconds:  # the router step runs inside aggregate_train
            router = self._router_seconds.pop(server_round, 0.0)
            seconds["aggregate"] = round(seconds["aggregate"] - router, 3)
            seconds["router_step"] = round(router, 3)
        seconds["clients"] = {
            k: round(v, 3) for k, v in sorted(self._client_seconds.pop(server_round, {}).items())
        }
        if self.metrics_log is not None:
            self.metrics_log.add(server_round, seconds=seconds)
            self.metrics_log.flush(server_round)

    def _add_client_seconds(self, server_round: int, replies: Iterable[Message]) -> None:
        """Sum the clients' own compute seconds (``*-seconds`` metrics) for the round row."""
        totals = self._client_seconds.setdefault(server_round, {})
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            for key, value in msg.content.metric_records["metrics"].items():
                if key.endswith("-seconds") and isinstance(value, int | float):
                    name = key.removesuffix("-seconds")
                    totals[name] = totals.get(name, 0.0) + float(value)

    def evaluation_due(self, server_round: int) -> bool:
        """Round 0, the last round and every ``evaluate_every``-th round (0: no others)."""
        if server_round == 0 or server_round == self.num_rounds:
            return True
        return self.evaluate_every > 0 and server_round % self.evaluate_every == 0

    def _evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        timeout: float,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        clock: RoundClock,
    ) -> tuple[MetricRecord | None, MetricRecord | None]:
        """Federated and centralised evaluation of the same ``arrays``, side by side.

        ``evaluate_fn`` runs in a thread while the server waits for the clients' replies:
        in a deployment the server's cores are otherwise idle then, and in a simulation
        its evaluation fills the gaps the clients leave (on a 2-core machine a fifth of the
        central evaluation's core-time was idle). The nodes are sampled first, so the
        thread cannot draw between the sampling seed and the sample; nothing the
        thread computes depends on the replies. ``(federated, central)`` results; both
        None in a round :meth:`evaluation_due` skips.
        """
        if not self.evaluation_due(server_round):
            return None, None
        messages = list(self.configure_evaluate(server_round, arrays, config, grid))

        def run_central() -> MetricRecord | None:
            with clock("central_evaluate"):
                return evaluate_fn(server_round, arrays)

        # leaving the block waits for the thread, also when the federated part raised
        with ThreadPoolExecutor(1, thread_name_prefix="central-evaluate") as pool:
            central = pool.submit(run_central) if evaluate_fn is not None else None
            with clock("federated_evaluate"):
                replies = grid.send_and_receive(messages=messages, timeout=timeout)
                fed = self.aggregate_evaluate(server_round, replies)
            return fed, central.result() if central is not None else None

    # ------------------------------------------------------------------ checkpoint state
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What the server has learnt besides the global parameters, as ``(tensors,
        json)``: the task's shared state (the retrieval app's prototype bank), the router
        and its Adam state, the minimax distribution and the per-round history. No
        pickles: tensors for safetensors, plain values for JSON."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"history": json.loads(json.dumps(self.history, default=float))}
        if self.task is not None:
            tensors.update({f"task.{k}": v for k, v in self.task.state_tensors().items()})
        if self.router is not None and self.router_opt is not None:
            tensors.update({f"router.{k}": v for k, v in self.router.state_dict().items()})
            opt = self.router_opt.state_dict()
            for idx, slots in opt["state"].items():
                for name, value in slots.items():
                    tensors[f"router_opt.{idx}.{name}"] = torch.as_tensor(value)
            meta["router_opt_param_groups"] = opt["param_groups"]
        if self.minimax is not None:
            meta["minimax"] = self.minimax.state()
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of :meth:`state_for_checkpoint`, bit for bit."""

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.history = {int(k): v for k, v in meta["history"].items()}
        if self.task is not None:
            self.task.load_state_tensors(part("task."))
        if self.router is not None and self.router_opt is not None:
            self.router.load_state_dict(part("router."), strict=True)
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in part("router_opt.").items():
                idx, name = key.split(".", 1)
                state.setdefault(int(idx), {})[name] = value
            groups = [
                {**g, "betas": tuple(g["betas"])} if "betas" in g else g
                for g in meta["router_opt_param_groups"]
            ]
            self.router_opt.load_state_dict({"state": state, "param_groups": groups})
        if self.minimax is not None:
            self.minimax = MinimaxWeights.from_state(meta["minimax"])

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
        replies = list(replies)
        self._add_client_seconds(server_round, replies)
        sent, waited = self.in_flight if self.in_flight is not None else ([], None)
        self.in_flight = None
        reports, dropped = validate_replies(
            replies,
            self.current,
            self.task,
            max_update_norm=self.options.max_update_norm,
            num_clients=self.num_clients,
            sent=sent,
            groups=self.options.groups,
        )
        silent = [
            m for m, why in unanswered(sent, replies) if why is None and m.metadata.message_id
        ]
        dropped += [(m.metadata.dst_node_id, f"no reply within {waited:.0f} s") for m in silent]
        record: dict = {"dropped": {str(n): why for n, why in dropped}}
        if len(reports) < max(self.options.min_valid_replies, 1):
            log.warning(
                "round %d skipped: %d valid replies (minimum %d); global parameters unchanged",
                server_round,
                len(reports),
                self.options.min_valid_replies,
            )
            self._record(server_round, {**record, "skipped": True})
            return None, None
        if not self.options.aggregate_unimodal:
            # the average over the paired clients only: what a practitioner does with
            # clients that cannot compute the contrastive loss (recorded, not dropped)
            record["left_out"] = [r.client_id for r in reports if r.partial]
            reports = [r for r in reports if not r.partial]
            if not reports:
                log.info(
                    "round %d: no paired client replied; global parameters unchanged", server_round
                )
                self._record(server_round, {**record, "skipped": True})
                return None, None

        towers = self.current if self.options.tower_aggregation else None
        if self.task is None:  # FedAvg / FedProx / FedPer: Flower's sample-count weights
            arrays = aggregate(reports, None, towers, self._group_of)
            w = sample_weights(reports)
            weights = {"router": w, "minimax": torch.full_like(w, 1 / len(w)), "fused": w}
            router_loss = None
        else:
            updates = updates_of(reports, self.current)
            tokens = self._tokens(reports, updates)
            # 2. router weights: an eval-mode forward, so no dropout noise reaches θ
            w_router = self._router_weights(reports, tokens)
            # 3. minimax weights
            w_minimax = self._minimax_weights(reports)
            # 4. fuse
            w = fuse_weights(w_router, w_minimax)
            # 5. aggregate
            arrays = aggregate(reports, w, towers, self._group_of)
            # 6. the task's shared state (the retrieval app's prototype bank)
            self.task.update_state(w, reports)
            # 7. router step on a train-mode forward of the same tokens
            router_loss = self._router_step(server_round, tokens, reports)
            weights = {"router": w_router, "minimax": w_minimax, "fused": w}

        if self.current is not None:
            arrays = server_step(self.current, arrays, self.options.server_lr)
        # 8. record (with where each update pointed: the diagnosis, not the method)
        record.update(
            skipped=False,
            updates=update_geometry(reports, self.current, arrays, self._group_of),
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

    def _group_of(self, key: str) -> str | None:
        """The parameter group of a shared array (the task's towers); None: ungrouped."""
        return self.options.groups.group_of(key) if self.options.groups is not None else None

    def _tokens(
        self, reports: list[ClientReport], updates: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor | None:
        if self.router is None:
            return None
        return torch.stack([self.task.token(r, u) for r, u in zip(reports, updates, strict=True)])

    def _router_weights(
        self, reports: list[ClientReport], tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """§5 step 2: the router's weights from an eval-mode forward (deterministic:
        the same tokens give the same weights); sample-count weights without a router."""
        if self.router is None or tokens is None:
            return sample_weights(reports)
        self.router.eval()
        with torch.no_grad():
            return self.router(tokens)

    def _minimax_weights(self, reports: list[ClientReport]) -> torch.Tensor:
        if self.minimax is None:
            return torch.full((len(reports),), 1.0 / len(reports))
        w = self.minimax.step([r.client_id for r in reports], [r.loss for r in reports])
        return torch.as_tensor(w, dtype=torch.float32)

    def _router_step(
        self, server_round: int, tokens: torch.Tensor | None, reports: list[ClientReport]
    ) -> float | None:
        """§5 step 7: one Adam step on the objective of a train-mode forward (dropout
        regularises the router; it never reaches the aggregation weights)."""
        if self.router is None or self.router_opt is None or tokens is None:
            return None
        started = time.perf_counter()
        self.router.train()
        loss = self.task.router_objective(self.router(tokens), reports)
        self.router_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.router_opt.step()
        self.router.eval()
        self._router_seconds[server_round] = time.perf_counter() - started
        return float(loss.detach())

    def _record(self, server_round: int, record: dict) -> None:
        self.history[server_round] = record
        if self.metrics_log is not None:
            self.metrics_log.add(server_round, **record)

    # ------------------------------------------------------------------ evaluate
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federated evaluation through the run's :class:`FederatedEvaluation` (weighted
        averages of numeric metrics unless the app names one); a reply that cannot be
        used is logged with its reason and left out."""
        replies = list(replies)
        self._add_client_seconds(server_round, replies)
        rows = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("evaluate: node %d failed: %s", node, last_line(msg.error.reason))
                continue
            metrics = msg.content.metric_records.get("metrics")
            try:
                if metrics is None:
                    raise ReplyError("missing MetricRecord 'metrics'")
                row = self.evaluation.parse(dict(metrics))
            except ReplyError as exc:
                log.warning("evaluate: dropping reply from node %d: %s", node, exc)
                continue
            if row is None:
                log.info("evaluate: node %d had nothing to evaluate", node)
                continue
            rows.append(row)
        if not rows:
            return None
        # replies arrive in completion order; a fixed order makes the float sums repeatable
        rows.sort(key=lambda r: r.get("partition-id", -1))
        summary = self.evaluation.summarise(rows)
        if self.metrics_log is not None:
            self.metrics_log.add(server_round, **{self.evaluation.key: summary})
        key = self.evaluation.key
        return MetricRecord({f"{key}-{k}": float(v) for k, v in summary["mean"].items()})
