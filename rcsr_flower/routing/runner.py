"""The routed run around the strategy: outputs, checkpoints, resume and the final result.

Every routed ServerApp needs the same wiring around ``RCSRStrategy.start``, and none of it
depends on the task: a run directory, ``result.json`` (``flwr run`` exits 0 when the
ServerApp fails, so callers read this file), ``metrics.jsonl``, a checkpoint after every
round, ``resume-from``, and the final state on disk. :class:`RoutedRun` does it once, for
the retrieval app (``rcsr_flower.server.app``) and any other task alike;
:func:`run_routed` is the whole ServerApp for a task that needs nothing else
(``examples/label-routing``, docs/extending.md).

From the run config it reads ``output-dir`` and ``run-name`` (the run directory:
``<output-dir>/<run-name>``, a timestamp when unnamed), ``resume-from`` (the directory of
an unfinished run to continue) and ``num-server-rounds``. It writes there:

- ``result.json``: ``{"status": "running", "pid": ...}`` first, ``"completed"`` (seconds,
  rounds, ``resumed_after_round``, the app's extra fields) or ``"failed"`` (error,
  traceback) last;
- ``config.json``: the run config;
- ``metrics.jsonl``: the strategy's row per round (``rcsr_flower.routing.outputs.MetricsLog``);
- ``checkpoint/``: the state after the last complete round (``rcsr_flower.routing.checkpoint``);
- ``<arrays>.safetensors`` (the global parameters), ``<state>.safetensors`` (the task's
  shared state), ``router.safetensors``, ``minimax.json``, ``history.json`` at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from safetensors.torch import save_file

from rcsr_flower.routing import provenance
from rcsr_flower.routing.checkpoint import Checkpoint, restore_rng, resume_point, save_checkpoint
from rcsr_flower.routing.errors import ConfigError
from rcsr_flower.routing.grid import prompt_grid
from rcsr_flower.routing.outputs import MetricsLog, run_dir, write_json
from rcsr_flower.routing.strategy import RCSRStrategy, RoutingOptions
from rcsr_flower.routing.task import FederatedEvaluation, RoutedTask

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class RoutedRun:
    """One routed run's directory, resume point, checkpoints and ``result.json``.

    Use it as a context manager around everything the ServerApp does, so that any
    failure, a bad config included, leaves a ``result.json`` that says why::

        with RoutedRun(context.run_config) as run:
            run.open(config)                      # resume point, config.json
            strategy = RCSRStrategy(task, options, n, metrics_log=run.metrics_log, ...)
            run.start(strategy, grid, initial_arrays, num_clients=n, num_rounds=rounds)
            run.complete()                        # result.json "completed"

    ``arrays_file`` and ``state_file`` name the final global parameters and the task's
    shared state (``<name>.safetensors``).
    """

    def __init__(
        self,
        run_config: Mapping[str, Any],
        *,
        arrays_file: str = "arrays",
        state_file: str = "task-state",
    ) -> None:
        # the run dir comes first, so even a bad config leaves a result.json that says why;
        # the pid says which process to stop (or, in the resume tests, what was killed)
        self.out: Path = run_dir(
            str(run_config.get("output-dir", "outputs")), str(run_config.get("run-name", ""))
        )
        self.started = time.time()
        self.load_at_start = provenance.load_1m()  # what else ran: the seconds need it to be read
        self.arrays_file = arrays_file
        self.state_file = state_file
        self.config: dict[str, Any] | None = None
        self.resume: Checkpoint | None = None
        self.state_key = ""
        self.checkpointed: list[int] = []  # the rounds this run checkpointed
        self.final_arrays: ArrayRecord | None = None
        self.result: dict | None = None
        self._metrics_log: MetricsLog | None = None
        write_json(self.out / "result.json", {"status": "running", "pid": os.getpid()})

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RoutedRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is not None:
            self.fail(exc, "".join(traceback.format_exception(exc_type, exc, tb)))
        elif self.result is None:
            if self.final_arrays is None:
                self.fail(RuntimeError("the ServerApp returned without running the strategy"))
            else:
                self.complete()
        return False  # an exception goes on to Flower, which marks the run failed

    def open(self, config: Mapping[str, Any], may_change: Iterable[str] = ()) -> Checkpoint | None:
        """Take the run's (validated) config: the checkpoint to continue when it names
        ``resume-from`` (refused in one line when it cannot be continued:
        ``rcsr_flower.routing.checkpoint.resume_point``, ``may_change`` naming the keys that may
        differ from the checkpoint's), and ``config.json``. Call it before any training."""
        config = dict(config)
        if "num-server-rounds" not in config:
            raise ConfigError(
                "the run config has no 'num-server-rounds' (add it to [tool.flwr.app.config])"
            )
        self.resume = resume_point(config, self.out, may_change)
        self.config = config
        write_json(self.out / "config.json", config)
        # clients may keep resume snapshots of their own state under this key
        self.state_key = self.resume.state_key if self.resume is not None else uuid.uuid4().hex
        return self.resume

    @property
    def metrics_log(self) -> MetricsLog:
        """The run's ``metrics.jsonl``; created on first use (afresh, or with the
        checkpoint's rows when resuming), so a run that fails before it leaves the file
        as it was."""
        if self._metrics_log is None:
            rows = self.resume.rows if self.resume is not None else []
            self._metrics_log = MetricsLog(self.out / "metrics.jsonl", rows)
        return self._metrics_log

    def check_num_clients(self, num_clients: int) -> None:
        """A resumed run must have the checkpointed run's number of clients (the minimax
        distribution has one entry per client)."""
        if self.resume is not None and self.resume.num_clients != num_clients:
            raise ConfigError(
                f"run-config 'resume-from' = {self.config.get('resume-from')!r}: the "
                f"checkpointed run had {self.resume.num_clients} clients, this federation "
                f"has {num_clients}"
            )

    # ------------------------------------------------------------------ the rounds
    def start(
        self,
        strategy: RCSRStrategy,
        grid: Grid,
        initial_arrays: ArrayRecord,
        *,
        num_clients: int,
        num_rounds: int | None = None,
        timeout: float = 3600.0,
        train_config: ConfigRecord | Mapping[str, Any] | None = None,
        evaluate_config: ConfigRecord | Mapping[str, Any] | None = None,
        evaluate_fn: EvaluateFn | None = None,
        central_key: str | None = "central",
    ) -> Result:
        """Run the strategy's rounds with a checkpoint after each, from the resume point
        when there is one; then write the final state. Returns Flower's ``Result``.

        On resume, the strategy's state (task state, router, minimax, history), the
        global parameters and the global RNGs come from the checkpoint and the rounds
        continue with their true numbers. The RNGs are restored last, so whatever the
        app drew while setting up does not shift what the rounds draw.

        ``evaluate_fn(round, arrays)`` is the centralised evaluation, in the rounds the
        strategy evaluates (:meth:`RCSRStrategy.evaluation_due`); what it returns joins
        the round's row as ``central_key`` (None: the app writes its own field through
        :attr:`metrics_log`).
        """
        if self.config is None:
            raise RuntimeError("RoutedRun.start before RoutedRun.open")
        self.check_num_clients(num_clients)
        if strategy.metrics_log is None:
            strategy.metrics_log = self.metrics_log
        elif strategy.metrics_log is not self.metrics_log:
            raise RuntimeError("the strategy writes another MetricsLog than the run's")
        num_rounds = int(self.config["num-server-rounds"]) if num_rounds is None else num_rounds
        first_round, fresh = 1, True
        resume = self.resume
        if resume is not None:
            strategy.restore_from_checkpoint(resume.strategy_tensors, resume.strategy_meta)
            initial_arrays = resume.arrays
            first_round, fresh = resume.round + 1, False
            restore_rng(resume)  # last: setup above drew from the global RNGs

        def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
            save_checkpoint(
                self.out,
                server_round,
                arrays,
                strategy.state_for_checkpoint(),
                self.metrics_log.rows,
                config=self.config,
                state_key=self.state_key,
                num_clients=num_clients,
            )
            self.checkpointed.append(server_round)

        result = strategy.start(
            grid=prompt_grid(grid),  # an app's own wrapper (the retrieval app's): as it is
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=_config_record(train_config),
            evaluate_config=_config_record(evaluate_config),
            evaluate_fn=self._central(evaluate_fn, central_key),
            first_round=first_round,
            fresh=fresh,  # a resume from round 0 must not evaluate round 0 again
            on_round_end=checkpoint,
        )
        self.final_arrays = result.arrays or initial_arrays
        self.save_final(self.final_arrays, strategy)
        return result

    def _central(self, evaluate_fn: EvaluateFn | None, key: str | None) -> EvaluateFn | None:
        if evaluate_fn is None or key is None:
            return evaluate_fn

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            res = evaluate_fn(server_round, arrays)
            if res is not None:
                self.metrics_log.add(server_round, **{key: dict(res)})
            return res

        return evaluate

    @property
    def last_checkpointed(self) -> int | None:
        """The last round checkpointed by this run or, before any, the resumed one."""
        if self.checkpointed:
            return self.checkpointed[-1]
        return self.resume.round if self.resume is not None else None

    def save_final(self, arrays: ArrayRecord, strategy: RCSRStrategy) -> None:
        """The final global parameters, task state and router (safetensors), the minimax
        distribution and the strategy's per-round history (JSON)."""
        _save(self.out / f"{self.arrays_file}.safetensors", arrays.to_torch_state_dict())
        if strategy.task is not None:
            _save(self.out / f"{self.state_file}.safetensors", strategy.task.state_tensors())
        if strategy.router is not None:
            _save(self.out / "router.safetensors", strategy.router.state_dict())
        if strategy.minimax is not None:
            write_json(self.out / "minimax.json", strategy.minimax.state())
        history = json.loads(json.dumps(strategy.history, default=float))
        write_json(self.out / "history.json", history)

    # ------------------------------------------------------------------ result.json
    def complete(self, **extra: Any) -> dict:
        """``result.json`` says ``completed``; ``extra`` fields follow the standard ones.

        ``machine`` is the server's (``provenance.machine``): this process has torch
        loaded already, and the launcher that writes ``provenance.json`` need not import
        it (1.2 s of every run's end)."""
        self.result = {
            "status": "completed",
            "seconds": round(time.time() - self.started, 1),
            "rounds": (self.config or {}).get("num-server-rounds"),
            "resumed_after_round": self.resume.round if self.resume is not None else None,
            "machine": provenance.machine(),
            "load_avg_1m": {"start": self.load_at_start, "end": provenance.load_1m()},
            **extra,
        }
        write_json(self.out / "result.json", self.result)
        return self.result

    def fail(self, exc: BaseException, trace: str | None = None) -> dict:
        """``result.json`` says ``failed``, with the error in one line and its traceback."""
        self.result = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": trace if trace is not None else "".join(traceback.format_exception(exc)),
            "seconds": round(time.time() - self.started, 1),
        }
        write_json(self.out / "result.json", self.result)
        return self.result


def _config_record(config: ConfigRecord | Mapping[str, Any] | None) -> ConfigRecord:
    if isinstance(config, ConfigRecord):
        return config
    return ConfigRecord(dict(config or {}))


def _save(path: Path, tensors: Mapping[str, Any]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def run_routed(
    grid: Grid,
    context: Context,
    task: RoutedTask,
    initial_arrays: ArrayRecord,
    *,
    num_clients: int,
    options: RoutingOptions | None = None,
    evaluation: FederatedEvaluation | None = None,
    evaluate_fn: EvaluateFn | None = None,
    train_config: Mapping[str, Any] | None = None,
    evaluate_config: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    evaluate_every: int | None = None,
    may_change: Iterable[str] = (),
    **fedavg_kwargs: Any,
) -> Result:
    """A whole routed ServerApp: ``RCSRStrategy(task, options)`` for ``num_clients``
    clients (partition ids ``0..num_clients-1``) from ``initial_arrays``, inside a
    :class:`RoutedRun` over ``context.run_config``: metrics, evaluation, checkpoints,
    ``resume-from`` and ``result.json`` with no further code.

    ``timeout`` (default: run-config ``round-timeout``, else 3600 s) bounds each round's
    wait for replies; ``evaluate_every`` (default: run-config ``eval-every``, else 1)
    spaces the federated and central evaluations (round 0 and the last always);
    ``may_change`` names the app's run-config keys a resumed run may set differently
    from the checkpointed one (``resume-from``, ``run-name`` and ``output-dir`` always
    may); ``fedavg_kwargs`` go to Flower's ``FedAvg``
    (``fraction_train``, ``min_available_nodes``, ...).
    """
    config = dict(context.run_config)
    with RoutedRun(config) as run:
        run.open(config, may_change)
        run.check_num_clients(num_clients)
        if evaluate_every is None:
            evaluate_every = int(config.get("eval-every", 1))
        strategy = RCSRStrategy(
            task,
            options if options is not None else RoutingOptions(),
            num_clients,
            metrics_log=run.metrics_log,
            evaluation=evaluation,
            evaluate_every=evaluate_every,
            **fedavg_kwargs,
        )
        if timeout is None:
            timeout = float(config.get("round-timeout", 3600.0))
        result = run.start(
            strategy,
            grid,
            initial_arrays,
            num_clients=num_clients,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
        run.complete()
    log.info("routed run finished: %s", run.out)
    return result
