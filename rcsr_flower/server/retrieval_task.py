"""Image–text retrieval as a routed task: what RCSR's strategy needs from it (§3–§5).

A client's ``"stats"`` record carries its prototypes ``p_I, p_T``, its update geometry,
its modality mask and its per-slot embedding sums and counts. From these the task builds
the router token ``[p_I, p_T, cos(p_I,p_T), geometry(4), mask(2), loss, r_k]``, the
router objective of §5 step 7, and the prototype-bank update of §3.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from rcsr_flower.backbones.adapters import TOWERS, tower_of
from rcsr_flower.modality import MODALITIES, Modality
from rcsr_flower.retrieval.metrics import RECALL_KEYS
from rcsr_flower.retrieval.prototypes import PrototypeBank, SlotStats
from rcsr_flower.routing.outputs import MetricsLog
from rcsr_flower.routing.router import entropy
from rcsr_flower.routing.task import ClientReport, ReplyError

log = logging.getLogger(__name__)

STATS_KEY = "stats"
GEOMETRY_DIM = 4


@dataclass
class RetrievalSummary:
    p_image: torch.Tensor  # [d]
    p_text: torch.Tensor  # [d]
    geometry: torch.Tensor  # [4]: log(1+‖Δ‖), ‖Δ_v‖/(‖Δ_v‖+‖Δ_t‖), cos(Δ,Δ_prev), log(1+‖Δ‖/√n)
    mask: torch.Tensor  # [2]: has image, has text
    slots: SlotStats


@dataclass
class RouterBetas:
    image: float = 1.0
    text: float = 1.0
    entropy: float = 0.1
    axis: float = 0.3


class RetrievalTask:
    """Implements :class:`~rcsr_flower.routing.task.RoutedTask` for image–text retrieval."""

    def __init__(
        self, bank: PrototypeBank, betas: RouterBetas | None = None, momentum: float = 0.95
    ) -> None:
        self.bank = bank
        self.betas = betas or RouterBetas()
        self.momentum = momentum

    @property
    def dim(self) -> int:
        return int(self.bank.image.shape[1])

    @property
    def token_dim(self) -> int:
        return 2 * self.dim + 1 + GEOMETRY_DIM + 2 + 1 + 1

    # ------------------------------------------------------------------ step 1
    def parse_reply(self, content: RecordDict) -> RetrievalSummary:
        if STATS_KEY not in content.array_records:
            raise ReplyError(f"missing ArrayRecord '{STATS_KEY}'")
        try:
            t = content.array_records[STATS_KEY].to_torch_state_dict()
        except Exception as exc:  # malformed arrays
            raise ReplyError(f"'{STATS_KEY}' does not decode: {exc}") from None
        d, c = self.dim, self.bank.slots

        def get(name: str, shape: tuple[int, ...], optional: bool = False):
            if name not in t:
                if optional:
                    return None
                raise ReplyError(f"'{STATS_KEY}' has no '{name}'")
            x = t[name]
            if tuple(x.shape) != shape:
                raise ReplyError(f"'{name}' has shape {tuple(x.shape)}, expected {shape}")
            if not x.is_floating_point():
                raise ReplyError(f"'{name}' has dtype {x.dtype}, expected a float dtype")
            if not torch.isfinite(x).all():
                raise ReplyError(f"'{name}' has non-finite values")
            return x.float()

        mask = get("mask", (2,))
        if not all(float(m) in (0.0, 1.0) for m in mask) or mask.sum() == 0:
            raise ReplyError(f"'mask' must be two 0/1 flags with at least one set, got {mask}")
        sides = {}
        for i, side in enumerate(("image", "text")):
            s = get(f"{side}_sum", (c, d), optional=True)
            n = get(f"{side}_count", (c,), optional=True)
            if bool(mask[i]) != (s is not None and n is not None):
                raise ReplyError(
                    f"mask says has-{side}={int(mask[i])} but {side} slot "
                    "statistics are " + ("missing" if mask[i] else "present")
                )
            if n is not None and (n < 0).any():
                raise ReplyError(f"'{side}_count' has negative counts")
            sides[side] = (s, n)
        geometry = get("geometry", (GEOMETRY_DIM,))
        log_norm, share, cos, log_per_example = geometry.tolist()
        if min(log_norm, log_per_example) < 0 or not 0 <= share <= 1 or abs(cos) > 1 + 1e-4:
            raise ReplyError(
                f"'geometry' is {[round(g, 4) for g in geometry.tolist()]}: expected "
                "[log(1+‖Δ‖) ≥ 0, tower share in [0, 1], cos in [-1, 1], log(1+‖Δ‖/√n) ≥ 0] "
                "(§4; a client from before the revision sends the unbounded ratio)"
            )
        return RetrievalSummary(
            p_image=get("p_image", (d,)),
            p_text=get("p_text", (d,)),
            geometry=geometry,
            mask=mask,
            slots=SlotStats(*sides["image"], *sides["text"]),
        )

    def example_content(self) -> RecordDict:
        """A well-formed paired client's ``"stats"`` record (for ``check_task``)."""
        g = torch.Generator().manual_seed(0)
        d, c = self.dim, self.bank.slots
        stats = {
            "p_image": F.normalize(torch.randn(d, generator=g), dim=0),
            "p_text": F.normalize(torch.randn(d, generator=g), dim=0),
            "geometry": torch.tensor([0.1, 0.5, 0.0, 0.01]),
            "mask": torch.ones(2),
            "image_sum": torch.randn(c, d, generator=g),
            "image_count": torch.ones(c),
            "text_sum": torch.randn(c, d, generator=g),
            "text_count": torch.ones(c),
        }
        return RecordDict({STATS_KEY: ArrayRecord(stats)})

    # ------------------------------------------------------------------ step 2
    def token(self, report: ClientReport, update: dict[str, torch.Tensor]) -> torch.Tensor:
        s: RetrievalSummary = report.summary
        cos = F.cosine_similarity(s.p_image, s.p_text, dim=0).reshape(1)
        r_k = torch.tensor([self.bank.retrieval_consistency(s.slots)])
        loss = torch.tensor([report.loss])
        return torch.cat([s.p_image, s.p_text, cos, s.geometry, s.mask, loss, r_k]).float()

    # ------------------------------------------------------------------ step 6
    def update_state(self, weights: torch.Tensor, reports: list[ClientReport]) -> None:
        summaries: list[RetrievalSummary] = [r.summary for r in reports]
        self.bank.update(
            weights.detach().tolist(),
            [s.slots for s in summaries],
            [s.p_image if s.mask[0] else None for s in summaries],
            [s.p_text if s.mask[1] else None for s in summaries],
            momentum=self.momentum,
        )

    # ------------------------------------------------------------------ step 7
    def router_objective(self, w_router: torch.Tensor, reports: list[ClientReport]) -> torch.Tensor:
        summaries: list[RetrievalSummary] = [r.summary for r in reports]
        return router_loss(
            w_router,
            torch.stack([s.p_image for s in summaries]),
            torch.stack([s.p_text for s in summaries]),
            self.bank.g_image,
            self.bank.g_text,
            self.betas,
            has_image=torch.stack([s.mask[0] > 0 for s in summaries]),
            has_text=torch.stack([s.mask[1] > 0 for s in summaries]),
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.bank.to_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bank = PrototypeBank.from_tensors(tensors)

    def state_records(self) -> dict[str, ArrayRecord]:
        return {
            "prototypes": ArrayRecord(
                {k: v.contiguous() for k, v in self.bank.to_tensors().items()}
            )
        }


def router_loss(
    w: torch.Tensor,
    p_image: torch.Tensor,
    p_text: torch.Tensor,
    g_image: torch.Tensor,
    g_text: torch.Tensor,
    betas: RouterBetas,
    has_image: torch.Tensor | None = None,
    has_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """§5 step 7 (ours, revised): only what a client holds enters the objective.

    ``softplus(β1(1−cos(ĝ_I,g_I)) + β2(1−cos(ĝ_T,g_T)) − β4·H(w) + β5·A)`` with
    ``ĝ_I = normalize(Σ_{k holds images} w_k p_I,k)`` and ``ĝ_T`` likewise over the text
    holders (a term without holders is 0), ``a_k = normalize(p_I,k − p_T,k)`` over the
    paired clients ``P``, ``â = normalize(Σ_{k∈P} w_k a_k)``,
    ``A = ½(1−cos(â, normalize(g_I − g_T))) + ½ Σ_{k∈P} w_k (1−cos(a_k, â))`` and
    ``A = 0`` without a paired client. A unimodal client's missing side is a placeholder
    (the global prototype itself): summed in, it would reward weighting clients by what
    they lack. ``has_image``/``has_text`` (bool ``[K]``) default to every client holding both.
    """
    ones = torch.ones(len(w), dtype=torch.bool)
    has_image = ones if has_image is None else has_image.bool()
    has_text = ones if has_text is None else has_text.bool()
    paired = has_image & has_text
    zero = w.new_zeros(())

    def drift(holders: torch.Tensor, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if not holders.any():
            return zero
        g_hat = F.normalize(w[holders] @ p[holders], dim=0)
        return 1 - g_hat @ F.normalize(g, dim=0)

    align = zero
    if paired.any():
        wp = w[paired]
        a = F.normalize(p_image[paired] - p_text[paired], dim=1)
        a_hat = F.normalize(wp @ a, dim=0)
        axis = F.normalize(g_image - g_text, dim=0)
        align = 0.5 * (1 - a_hat @ axis) + 0.5 * (wp * (1 - a @ a_hat)).sum()
    inner = (
        betas.image * drift(has_image, p_image, g_image)
        + betas.text * drift(has_text, p_text, g_text)
        - betas.entropy * entropy(w)
        + betas.axis * align
    )
    return F.softplus(inner)


# ---------------------------------------------------------------------------- evaluation
SUMMARY_KEYS = (*RECALL_KEYS, "rsum")


class PersonalizedRetrieval:
    """§6 personalised evaluation as the strategy's :class:`FederatedEvaluation`:
    each client's recalls on its local test split, summarised overall and per modality
    group (``metrics.jsonl`` field ``personalized``)."""

    key = "personalized"

    def parse(self, metrics: dict) -> dict | None:
        if "rsum" not in metrics:
            return None  # a local test split too small to rank
        missing = [k for k in (*SUMMARY_KEYS, "modality") if k not in metrics]
        if missing:
            raise ReplyError(f"evaluation metrics lack {missing}")
        try:
            group = Modality.from_code(metrics["modality"])
        except ValueError as exc:
            raise ReplyError(str(exc)) from None
        return {**metrics, "group": str(group)}

    def summarise(self, rows: list[dict]) -> dict:
        return personalized_summary([(r["group"], r) for r in rows])


def personalized_summary(per_client: list[tuple[str, dict[str, float]]]) -> dict:
    """§6: mean, std and worst 10% of clients (by rsum; at least one client),
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
        for name in MODALITIES
        if (group := stats([m for mod, m in per_client if mod == name]))
    }
    return out


def make_evaluate_fn(
    metrics_log: MetricsLog,
    evaluate: Callable[[ArrayRecord], dict],
) -> Callable:
    """Centralised evaluation for the strategy, which calls it in the rounds it evaluates
    (``eval-every``: :meth:`RCSRStrategy.evaluation_due`).

    Its metrics join the round's row, which the strategy writes when the round ends."""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate(arrays)
        metrics_log.add(server_round, **{"global": metrics})
        log.info("round %d global: rsum %.2f", server_round, metrics["rsum"])
        return MetricRecord({k: float(metrics[k]) for k in SUMMARY_KEYS})

    return evaluate_fn


# ---------------------------------------------------------------------------- towers
class TowerGroups:
    """The retrieval app's parameter groups (§5 step 5, tower-wise): an adapter array
    belongs to its tower, and a client trained the towers of its modality, whose code
    every train reply carries (``modality``)."""

    names = frozenset(TOWERS)

    def group_of(self, key: str) -> str | None:
        return tower_of(key)

    def held(self, metrics: MetricRecord) -> frozenset[str] | None:
        if "modality" not in metrics:
            return None
        try:
            return Modality.from_code(metrics["modality"]).towers
        except ValueError as exc:
            raise ReplyError(str(exc)) from None


TOWER_GROUPS = TowerGroups()
