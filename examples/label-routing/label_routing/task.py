"""The label-routing task: data, model and client steps, and the ``RoutedTask`` the
server routes with.

Each client holds a few hundred 16-feature examples of 6 classes whose label mix is
drawn from a Dirichlet distribution (non-IID labels), generated deterministically from
``(seed, partition-id)``: nothing is downloaded. A client trains a 16→32→6 MLP and
replies, besides its parameters and the standard metrics, its label histogram
(the ``"labels"`` record). The server's :class:`LabelRoutingTask` turns a reply into
the router token ``[train loss, log1p‖Δ‖, entropy of the label histogram]``, keeps a
shared label prior updated with the fused weights (shipped to the clients with every
train message), and asks the router for weights whose mix of labels covers every class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from rcsr_flower.routing.task import ClientReport, ReplyError

LABELS = "labels"  # the reply's ArrayRecord with the client's label histogram
PRIOR = "prior"  # the train message's ArrayRecord with the server's label prior
TEST_PER_CLIENT = 32
TEST_PER_CLASS = 50  # the server's balanced test set


@dataclass(frozen=True)
class TaskConfig:
    """The task's part of ``[tool.flwr.app.config]``, checked."""

    num_clients: int = 4
    num_classes: int = 6
    num_features: int = 16
    hidden: int = 32
    alpha: float = 0.3
    examples_per_client: int = 96
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.1
    prior_momentum: float = 0.5
    seed: int = 0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> TaskConfig:
        """Read the kebab-case keys; raise ``ValueError`` naming a key that is out of range."""
        ints = ("num-clients", "num-classes", "num-features", "hidden", "examples-per-client")
        ints += ("local-epochs", "batch-size", "seed")
        values = {k.replace("-", "_"): int(run_config[k]) for k in ints}
        floats = ("alpha", "lr", "prior-momentum")
        values |= {k.replace("-", "_"): float(run_config[k]) for k in floats}
        cfg = cls(**values)
        for key, ok in (
            ("num-clients", cfg.num_clients >= 1),
            ("num-classes", cfg.num_classes >= 2),
            ("num-features", cfg.num_features >= 1),
            ("hidden", cfg.hidden >= 1),
            ("examples-per-client", cfg.examples_per_client >= 2),
            ("local-epochs", cfg.local_epochs >= 1),
            ("batch-size", cfg.batch_size >= 1),
            ("alpha", cfg.alpha > 0),
            ("lr", cfg.lr > 0),
            ("prior-momentum", 0 <= cfg.prior_momentum < 1),
        ):
            if not ok:
                raise ValueError(f"run-config '{key}' = {run_config[key]!r} is out of range")
        return cfg


# ------------------------------------------------------------------------------ data
def _class_means(cfg: TaskConfig) -> np.ndarray:
    return 1.5 * np.random.default_rng([cfg.seed, 1 << 20]).normal(
        size=(cfg.num_classes, cfg.num_features)
    )


def _examples(cfg: TaskConfig, rng: np.random.Generator, labels: np.ndarray):
    x = _class_means(cfg)[labels] + rng.normal(size=(len(labels), cfg.num_features))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def client_data(cfg: TaskConfig, partition_id: int, split: str):
    """``(x, y)`` of one client's ``"train"`` or ``"test"`` split: labels drawn from the
    client's own Dirichlet(``alpha``) mix, so clients see different classes."""
    rng = np.random.default_rng([cfg.seed, partition_id])
    mix = rng.dirichlet([cfg.alpha] * cfg.num_classes)
    n_train = cfg.examples_per_client * (1 + partition_id) // 2 + 1
    train_labels = rng.choice(cfg.num_classes, size=n_train, p=mix)
    train = _examples(cfg, rng, train_labels)
    if split == "train":
        return train
    return _examples(cfg, rng, rng.choice(cfg.num_classes, size=TEST_PER_CLIENT, p=mix))


def global_test_set(cfg: TaskConfig):
    """The server's test set: every class equally often."""
    rng = np.random.default_rng([cfg.seed, 1 << 21])
    return _examples(cfg, rng, np.repeat(np.arange(cfg.num_classes), TEST_PER_CLASS))


# ------------------------------------------------------------------------------ model
def make_model(cfg: TaskConfig) -> nn.Module:
    return nn.Sequential(
        nn.Linear(cfg.num_features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.num_classes)
    )


def initial_arrays(cfg: TaskConfig) -> ArrayRecord:
    torch.manual_seed(cfg.seed)
    return ArrayRecord(make_model(cfg).state_dict())


def _loaded(cfg: TaskConfig, arrays: ArrayRecord) -> nn.Module:
    model = make_model(cfg)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


# ------------------------------------------------------------------------------ client
def histogram(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(y, minlength=num_classes).float()


def train_client(
    cfg: TaskConfig,
    arrays: ArrayRecord,
    prior: torch.Tensor | None,
    partition_id: int,
    server_round: int,
) -> tuple[dict[str, torch.Tensor], dict[str, int | float], torch.Tensor]:
    """Local SGD on the client's split; returns ``(parameters, metrics, label histogram)``.

    With the server's label ``prior``, the logits are adjusted by the client's label
    shift, ``log p_local − log prior`` (logit adjustment, Menon et al. 2021), so the
    local model learns the classifier of the federation's label mix rather than its own.
    ``train-loss`` is the mean cross-entropy over every local step: the minimax weights
    give clients with a higher one more weight.
    """
    x, y = client_data(cfg, partition_id, "train")
    counts = histogram(y, cfg.num_classes)
    adjust = torch.zeros(cfg.num_classes)
    if prior is not None:
        local = (counts + 1) / (counts.sum() + cfg.num_classes)
        adjust = torch.log(local) - torch.log(prior.float().clamp_min(1e-6))
    model = _loaded(cfg, arrays)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + server_round * 1_009 + partition_id)
    total, seen = 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(model(x[batch]) + adjust, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
    metrics = {"num-examples": len(y), "train-loss": total / seen, "partition-id": partition_id}
    return model.state_dict(), metrics, counts


def evaluate_client(cfg: TaskConfig, arrays: ArrayRecord, partition_id: int) -> dict:
    """The global model on the client's own test split."""
    x, y = client_data(cfg, partition_id, "test")
    accuracy, loss = _accuracy_and_loss(_loaded(cfg, arrays), x, y)
    return {
        "num-examples": len(y),
        "accuracy": accuracy,
        "eval-loss": loss,
        "partition-id": partition_id,
    }


def _accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


# ------------------------------------------------------------------------------ server
def central_evaluation(cfg: TaskConfig) -> Callable[[int, ArrayRecord], MetricRecord]:
    """``evaluate_fn`` for the runner: the global model on the balanced test set."""
    x, y = global_test_set(cfg)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracy, loss = _accuracy_and_loss(_loaded(cfg, arrays), x, y)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    return evaluate


class LabelRoutingTask:
    """:class:`~rcsr_flower.routing.task.RoutedTask` for label-skewed classification.

    The shared state is a label prior, the fused-weight mix of the clients' label
    histograms with momentum; the router learns weights whose mix of labels covers every
    class (KL from the uniform distribution), with a small pull towards low-loss clients.
    """

    token_dim = 3

    def __init__(self, num_classes: int, momentum: float = 0.5) -> None:
        self.num_classes = num_classes
        self.momentum = momentum
        self.prior = torch.full((num_classes,), 1.0 / num_classes)

    def parse_reply(self, content: RecordDict) -> torch.Tensor:
        """The client's label histogram, checked: ``float32[num_classes]``, finite,
        non-negative, not all zero."""
        record = content.array_records.get(LABELS)
        if record is None or "histogram" not in record:
            raise ReplyError(f"missing ArrayRecord '{LABELS}' with a 'histogram'")
        hist = record["histogram"].numpy()  # np.load(allow_pickle=False)
        if hist.shape != (self.num_classes,) or hist.dtype != np.float32:
            raise ReplyError(
                f"'{LABELS}.histogram' is {hist.dtype}{list(hist.shape)}, "
                f"expected float32[{self.num_classes}]"
            )
        if not np.isfinite(hist).all() or (hist < 0).any() or hist.sum() <= 0:
            raise ReplyError(f"'{LABELS}.histogram' must be finite, >= 0 and not all zero")
        return torch.from_numpy(hist.copy())

    def token(self, report: ClientReport, update: dict[str, torch.Tensor]) -> torch.Tensor:
        norm = torch.sqrt(sum((u.float() ** 2).sum() for u in update.values()))
        p = report.summary / report.summary.sum()
        label_entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        loss = torch.tensor(report.loss, dtype=torch.float32)
        return torch.stack([loss, torch.log1p(norm), label_entropy]).float()

    def router_objective(self, w_router: torch.Tensor, reports: list[ClientReport]) -> torch.Tensor:
        mixes = torch.stack([r.summary / r.summary.sum() for r in reports])
        mix = (w_router[:, None] * mixes).sum(0)  # the labels the weighted average learns
        coverage = (math.log(1.0 / self.num_classes) - torch.log(mix.clamp_min(1e-8))).mean()
        losses = torch.tensor([r.loss for r in reports])
        return coverage + 0.1 * (w_router * losses).sum()

    def update_state(self, weights: torch.Tensor, reports: list[ClientReport]) -> None:
        mixes = torch.stack([r.summary / r.summary.sum() for r in reports])
        mix = (weights.detach()[:, None] * mixes).sum(0) / weights.detach().sum()
        prior = self.momentum * self.prior + (1 - self.momentum) * mix
        self.prior = prior / prior.sum()

    def state_records(self) -> dict[str, ArrayRecord]:
        return {PRIOR: ArrayRecord({PRIOR: self.prior.clone()})}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {PRIOR: self.prior.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.prior = tensors[PRIOR].float().clone()

    def example_content(self) -> RecordDict:
        """One well-formed reply's extra records, for ``check_task``."""
        return RecordDict({LABELS: ArrayRecord({"histogram": torch.ones(self.num_classes)})})
