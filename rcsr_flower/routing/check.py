"""``check_task``: a routed task's mistakes in one line, before any client trains.

Without it, a float64 token, an objective that ignores the weights or ``state_records``
returning a tensor surface only after a full round of client training, as a torch error
deep inside the strategy. :func:`check_task` runs one fake round on synthetic reports —
parse, token, router objective and its gradient, state update, the records shipped to
clients, the checkpoint round trip — and raises :class:`TaskCheckError` naming the
method and the problem. ``RCSRStrategy.start`` calls it before round 1.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict

from rcsr_flower.routing.task import ClientReport, RoutedTask


class TaskCheckError(TypeError):
    """A routed task breaks the :class:`~rcsr_flower.routing.task.RoutedTask` contract."""


def check_task(task: RoutedTask, arrays: ArrayRecord, clients: int = 3) -> None:
    """One fake round of ``task`` on ``clients`` synthetic reports built from ``arrays``
    (the global parameters) and the task's ``example_content()`` records, if it has one.

    The task's state is left as it was: what the fake round changes is restored from
    ``state_tensors()``."""
    name = type(task).__name__

    def fail(method: str, problem: str) -> TaskCheckError:
        return TaskCheckError(f"{name}.{method}: {problem}")

    saved = _call(fail, "state_tensors", task.state_tensors)
    _tensor_dict(fail, "state_tensors", saved)
    saved = {k: v.detach().clone() for k, v in saved.items()}  # update_state may work in place
    dim = getattr(task, "token_dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise fail("token_dim", f"is {dim!r}, expected a positive int")

    example = getattr(task, "example_content", None)
    content = _call(fail, "example_content", example) if callable(example) else RecordDict()
    theta = arrays.to_torch_state_dict()
    g = torch.Generator().manual_seed(0)
    reports, updates = [], []
    for k in range(clients):
        summary = _call(fail, "parse_reply", task.parse_reply, content)
        update = {key: 1e-3 * torch.randn(v.shape, generator=g) for key, v in theta.items()}
        trained = ArrayRecord({key: (theta[key] + u).contiguous() for key, u in update.items()})
        reports.append(ClientReport(k + 1, k, 10 * (k + 1), 1.0 + k, trained, summary))
        updates.append(update)

    for report, update in zip(reports, updates, strict=True):
        token = _call(fail, "token", task.token, report, update)
        if not isinstance(token, torch.Tensor):
            raise fail("token", f"returned {type(token).__name__}, expected a torch.Tensor")
        if tuple(token.shape) != (dim,):
            raise fail("token", f"has shape {tuple(token.shape)}, expected ({dim},) = token_dim")
        if token.dtype != torch.float32:
            raise fail("token", f"has dtype {token.dtype}, expected torch.float32 (the router's)")
        if not torch.isfinite(token).all():
            raise fail("token", "has non-finite values")

    w = torch.full((clients,), 1.0 / clients, requires_grad=True)
    loss = _call(fail, "router_objective", task.router_objective, w, reports)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise fail("router_objective", f"returned {loss!r}, expected a scalar tensor")
    if not torch.isfinite(loss).all():
        raise fail("router_objective", f"is {float(loss)}, expected a finite value")
    if not loss.requires_grad:
        raise fail(
            "router_objective",
            "does not depend on the weights w (no gradient reaches them): the router can "
            "only learn from a differentiable function of w",
        )
    (grad,) = torch.autograd.grad(loss.reshape(()), w, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all():
        raise fail("router_objective", "gives no finite gradient with respect to w")

    _call(fail, "update_state", task.update_state, w.detach(), reports)
    records = _call(fail, "state_records", task.state_records)
    if not isinstance(records, dict) or not all(
        isinstance(k, str) and isinstance(v, ArrayRecord) for k, v in records.items()
    ):
        raise fail(
            "state_records",
            f"returned {type(records).__name__}, expected dict[str, ArrayRecord] "
            "(the records shipped with every train message)",
        )
    after = _call(fail, "state_tensors", task.state_tensors)
    _tensor_dict(fail, "state_tensors", after)
    _call(fail, "load_state_tensors", task.load_state_tensors, after)
    again = _call(fail, "state_tensors", task.state_tensors)
    if set(again) != set(after) or not all(torch.equal(again[k], after[k]) for k in after):
        raise fail(
            "load_state_tensors",
            "does not restore what state_tensors returned: a resumed run would differ",
        )
    task.load_state_tensors(saved)  # the fake round leaves no trace


def _call(fail, method: str, fn, *args):
    try:
        return fn(*args)
    except TaskCheckError:
        raise
    except Exception as exc:
        raise fail(method, f"raised {type(exc).__name__}: {exc}") from exc


def _tensor_dict(fail, method: str, value) -> None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise fail(method, f"returned {type(value).__name__}, expected dict[str, torch.Tensor]")
