"""A client's round: the local training step (§4) and what its reply reports about its
data (prototype statistics, embeddings).

Flower types stay out of this module: the handlers turn messages into these calls.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcsr_flower.backbones.adapters import AdapterSet, tower_of
from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.client import losses
from rcsr_flower.client.data import ClientData
from rcsr_flower.retrieval.evaluation import first_block
from rcsr_flower.retrieval.prototypes import PrototypeBank
from rcsr_flower.retrieval.zero_shot import ZeroShotMemo

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainSettings:
    """One round's client settings: the run config plus what the server sent."""

    lr: float
    epochs: int = 1
    batch_size: int = 128
    weight_decay: float = 0.01
    temperature: float = 0.07
    proto_temperature: float = 0.07
    lambda_anchor: float = 1.0
    lambda_align: float = 0.1
    prox_mu: float = 0.0  # λ_stab (RCSR) or FedProx's μ; 0 = no proximal term
    anchoring: bool = True
    anchoring_loss: str = "soft"  # "soft" (losses.anchor_soft) | "ce" (the paper's CE)
    steps: int = 0  # > 0: exactly this many local steps, overriding ``epochs``


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled mini-batches; a trailing batch of one joins the previous one."""
    order = torch.randperm(n, generator=generator)
    out = list(order.split(batch_size))
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2] = torch.cat([out[-2], out.pop()])
    return out


def pick_captions(
    captions: Sequence[list[str]], idx: torch.Tensor, generator: torch.Generator
) -> list[tuple[int, int]]:
    """One caption per image, drawn at random each epoch: ``(item, caption index)``."""
    draws = torch.randint(0, 1 << 30, (len(idx),), generator=generator).tolist()
    return [(i, d % len(captions[i])) for i, d in zip(idx.tolist(), draws, strict=True)]


def _prefix(data: ClientData, tower: str, adapters: Sequence[AdapterSet | None]):
    """The cached prefix of ``tower`` when it ends where these adapters start, else None."""
    prefix = data.prefix.get(tower)
    if prefix is not None and prefix.block == first_block(tower, adapters):
        return prefix
    return None


def train_image_features(
    backbone: Backbone, data: ClientData, idx: torch.Tensor, adapters: Sequence[AdapterSet | None]
) -> torch.Tensor:
    """``z_I`` of training items ``idx``: from the cached frozen prefix when there is one."""
    prefix = _prefix(data, "vision", adapters)
    if prefix is not None:
        return backbone.image_features(prefix.images(idx), *adapters, prefix_block=prefix.block)
    return backbone.image_features(data.train.pixels[idx], *adapters)


def train_text_features(
    backbone: Backbone,
    data: ClientData,
    picks: Sequence[tuple[int, int]],
    adapters: Sequence[AdapterSet | None],
) -> torch.Tensor:
    """``z_T`` of training captions ``(item, caption index)``, from the cached prefix when
    there is one (same captions, same padding, so the same embeddings)."""
    prefix = _prefix(data, "text", adapters)
    if prefix is not None:
        rows = [int(prefix.row[i]) + j for i, j in picks]
        hidden, tokens = prefix.captions(rows, backbone.tokenizer.pad_token_id or 0)
        return backbone.text_features(tokens, *adapters, prefix=(prefix.block, hidden))
    texts = [data.train.captions[i][j] for i, j in picks]
    return backbone.text_features(backbone.tokenize(texts), *adapters)


def client_loss(
    backbone: Backbone,
    data: ClientData,
    idx: torch.Tensor,
    adapters: Sequence[AdapterSet | None],
    bank: PrototypeBank | None,
    settings: TrainSettings,
    generator: torch.Generator,
    teacher: Sequence[AdapterSet | None] | None = None,
) -> torch.Tensor | None:
    """§4 loss of one batch by modality, without ``L_prox`` (added by the caller).

    A missing modality's tower is never run. Returns None when the client has no loss
    term (a unimodal client without anchoring). ``teacher`` (the round's starting adapters)
    is needed by ``anchoring-loss = "soft"``, which anchors relative to it.
    """
    anchor = settings.anchoring and bank is not None
    soft = anchor and settings.anchoring_loss == "soft"
    if soft and teacher is None:
        raise ValueError("anchoring-loss 'soft' needs the round's starting adapters (teacher)")
    if data.modality == "paired":
        picks = pick_captions(data.train.captions, idx, generator)
        z_i = train_image_features(backbone, data, idx, adapters)
        z_t = train_text_features(backbone, data, picks, adapters)
        loss = losses.info_nce_sym(z_i, z_t, settings.temperature)
        if anchor and settings.lambda_align > 0:
            taught = None
            if soft:
                with torch.no_grad():
                    taught = (
                        train_image_features(backbone, data, idx, teacher),
                        train_text_features(backbone, data, picks, teacher),
                    )
            loss = loss + settings.lambda_align * losses.proto_alignment(
                z_i, z_t, bank.image, bank.text, settings.proto_temperature, teacher=taught
            )
        return loss
    if not anchor:
        return None
    if data.modality == "image-only":

        def features(a: Sequence[AdapterSet | None]) -> torch.Tensor:
            return train_image_features(backbone, data, idx, a)

        own, other = bank.image, bank.text
    else:
        picks = pick_captions(data.train.captions, idx, generator)

        def features(a: Sequence[AdapterSet | None]) -> torch.Tensor:
            return train_text_features(backbone, data, picks, a)

        own, other = bank.text, bank.image
    z = features(adapters)
    if soft:
        with torch.no_grad():
            z0 = features(teacher)
        slots = losses.assign_slots(z0, own)
        loss = losses.anchor_soft(z, z0, other, slots, settings.proto_temperature)
    else:
        slots = losses.assign_slots(z.detach(), own)
        loss = losses.anchor_ce(z, other, slots, settings.proto_temperature)
    return settings.lambda_anchor * loss


def step_batches(
    n: int, batch_size: int, epochs: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """The round's mini-batches: ``epochs`` passes, or with ``steps > 0`` exactly ``steps``
    batches, reshuffling at each pass (so small and large clients do equal work)."""
    if steps <= 0:
        for _ in range(epochs):
            yield from batches(n, batch_size, generator)
        return
    done = 0
    while done < steps:
        for idx in batches(n, batch_size, generator):
            yield idx
            done += 1
            if done == steps:
                return


def local_train(
    backbone: Backbone,
    shared: AdapterSet,
    personal: AdapterSet | None,
    data: ClientData,
    bank: PrototypeBank | None,
    settings: TrainSettings,
    seed: int,
) -> dict:
    """Train shared (+ personal) adapters for ``settings.epochs`` (or ``settings.steps``)
    on the client's data.

    ``L_prox = ½‖θ_k − θ‖²`` ties the shared adapters to the round's global ones; personal
    adapters are never proximal-regularised (they are the client's own). Soft anchoring
    measures against a frozen copy of the adapters as the round found them.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train)
    result = {"loss": 0.0, "steps": 0, "num_examples": n}
    if n < 2:
        return result
    modules = [m for m in (shared, personal) if m is not None]
    # only the towers of the modalities the client holds: a missing tower is never run,
    # and its adapters must not drift (weight decay, prox) either
    towers = [t for t, has in (("vision", data.has_image), ("text", data.has_text)) if has]
    params = [p for m in modules for t in towers for p in m.tower_parameters(t)]
    shared_params = [p for t in towers for p in shared.tower_parameters(t)]
    anchors = [p.detach().clone() for p in shared_params]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    teacher = None
    if settings.anchoring and settings.anchoring_loss == "soft" and bank is not None:
        teacher = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    for m in modules:
        m.train()
    total = []
    plan = step_batches(n, settings.batch_size, settings.epochs, settings.steps, gen)
    for idx in plan:
        loss = client_loss(backbone, data, idx, modules, bank, settings, gen, teacher)
        if loss is None:  # nothing to learn from: Δ = 0, as naive FedAvg does
            return result
        if settings.prox_mu > 0:
            loss = loss + settings.prox_mu * losses.prox(shared_params, anchors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total.append(float(loss.detach()))
    return {"loss": sum(total) / max(len(total), 1), "steps": len(total), "num_examples": n}


# ---------------------------------------------------------------------------- statistics
def _sample(n: int, limit: int, seed: int) -> torch.Tensor:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:limit].sort().values


def local_embeddings(
    backbone: Backbone,
    data: ClientData,
    adapters: Sequence[AdapterSet | None],
    limit: int,
    seed: int,
    batch_size: int = 256,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(z_I, z_T)`` of up to ``limit`` training items (first caption), None if missing."""
    idx = _sample(len(data.train), limit, seed)
    z_i = z_t = None
    with torch.no_grad():
        if data.has_image:
            z_i = torch.cat(
                [
                    train_image_features(backbone, data, b, adapters).cpu()
                    for b in idx.split(batch_size)
                ]
            )
        if data.has_text:
            z_t = torch.cat(
                [
                    train_text_features(
                        backbone, data, [(i, 0) for i in b.tolist()], adapters
                    ).cpu()
                    for b in idx.split(batch_size)
                ]
            )
    return z_i, z_t


def tower_norm(delta: dict[str, torch.Tensor], tower: str) -> torch.Tensor:
    """``‖Δ_tower‖`` in float64 over the adapters of one tower (0 when it has none)."""
    parts = [v.flatten() for k, v in delta.items() if tower_of(k) == tower]
    return torch.cat(parts).double().norm() if parts else torch.zeros((), dtype=torch.float64)


def update_geometry(
    delta: dict[str, torch.Tensor],
    previous: dict[str, torch.Tensor] | None,
    num_examples: int,
    eps: float = 1e-12,
) -> torch.Tensor:
    """§4 (ours, revised): ``[log(1+‖Δ‖), ‖Δ_v‖/(‖Δ_v‖+‖Δ_t‖+ε), cos(Δ, Δ_prev),
    log(1+‖Δ‖/√n)]``, every feature O(1).

    The authors' ratio ``‖Δ_v‖/(‖Δ_t‖+ε)`` is ~1e8 for an image-only client (its text tower
    never moves) and swamps the router's LayerNorm; the tower share lies in [0, 1]
    (1 = only the vision tower moved, 0.5 for a client that moved neither) and norms
    enter as ``log(1+x)``. ``cos`` is 0 without ``Δ_prev``.
    """
    flat = torch.cat([v.flatten() for v in delta.values()]).double()
    vision, text = tower_norm(delta, "vision"), tower_norm(delta, "text")
    norm = flat.norm()
    moved = vision + text
    share = vision / moved if moved > eps else torch.tensor(0.5, dtype=flat.dtype)
    cos = torch.zeros((), dtype=flat.dtype)
    if previous is not None:
        prev = torch.cat([previous[k].flatten() for k in delta]).double()
        if norm > eps and prev.norm() > eps:
            cos = torch.dot(flat, prev) / (norm * prev.norm())
    per_example = norm / max(num_examples, 1) ** 0.5
    return torch.stack([torch.log1p(norm), share, cos, torch.log1p(per_example)]).float()


def client_statistics(
    backbone: Backbone,
    data: ClientData,
    shared: AdapterSet,
    bank: PrototypeBank,
    delta: dict[str, torch.Tensor],
    previous_delta: dict[str, torch.Tensor] | None,
    limit: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The reply's ``"stats"`` of §4: prototypes, geometry, mask, slot sums/counts.

    Computed with the trained shared adapters (the global space). A missing modality's
    prototype is the current global one, flagged by the mask. Slots come from the side
    the client has (paired clients: the text side).
    """
    z_i, z_t = local_embeddings(backbone, data, [shared], limit, seed)
    stats = {
        "p_image": F.normalize(z_i.mean(0), dim=0) if z_i is not None else bank.g_image,
        "p_text": F.normalize(z_t.mean(0), dim=0) if z_t is not None else bank.g_text,
        "geometry": update_geometry(delta, previous_delta, len(data.train)),
        "mask": torch.tensor([float(data.has_image), float(data.has_text)]),
    }
    slots = (
        losses.assign_slots(z_t, bank.text)
        if z_t is not None
        else losses.assign_slots(z_i, bank.image)
    )
    for side, z in (("image", z_i), ("text", z_t)):
        if z is None:
            continue
        stats[f"{side}_sum"] = torch.zeros(bank.slots, z.shape[1]).index_add_(0, slots, z)
        stats[f"{side}_count"] = torch.bincount(slots, minlength=bank.slots).float()
    return {k: v.detach().float().contiguous() for k, v in stats.items()}


def bootstrap_groups(
    backbone: Backbone,
    data: ClientData,
    num_slots: int,
    limit: int,
    seed: int,
    memo: ZeroShotMemo | None = None,
) -> dict[str, torch.Tensor] | None:
    """§3 bootstrap reply of a paired client: k-means of ``normalize(z_I + z_T)``
    into ``min(C, n/4)`` groups, each group's image mean, text mean and count.

    It runs the frozen backbone alone: with a ``memo``, the groups of these very items
    come from there when computed before (:mod:`rcsr_flower.retrieval.zero_shot`)."""
    if data.modality != "paired" or len(data.train) < 1:
        return None
    if memo is None:
        return _bootstrap_groups(backbone, data, num_slots, limit, seed)
    idx = _sample(len(data.train), limit, seed)
    parts = [
        data.train.pixels[idx],
        [data.train.captions[i][0] for i in idx.tolist()],
        [[tower, p.block] for tower, p in sorted(data.prefix.items())],
        num_slots,
        limit,
        seed,
    ]
    return memo.tensors(
        backbone,
        "bootstrap",
        parts,
        lambda: _bootstrap_groups(backbone, data, num_slots, limit, seed),
    )


def _bootstrap_groups(
    backbone: Backbone, data: ClientData, num_slots: int, limit: int, seed: int
) -> dict[str, torch.Tensor]:
    from sklearn.cluster import KMeans

    z_i, z_t = local_embeddings(backbone, data, [], limit, seed)
    joint = F.normalize(z_i + z_t, dim=1).numpy()
    k = max(1, min(num_slots, len(joint) // 4))
    labels = torch.as_tensor(KMeans(n_clusters=k, n_init=3, random_state=seed).fit(joint).labels_)
    counts = torch.bincount(labels, minlength=k).float()
    sums_i = torch.zeros(k, z_i.shape[1]).index_add_(0, labels, z_i)
    sums_t = torch.zeros(k, z_t.shape[1]).index_add_(0, labels, z_t)
    keep = counts > 0
    return {
        "image_means": (sums_i[keep] / counts[keep, None]).contiguous(),
        "text_means": (sums_t[keep] / counts[keep, None]).contiguous(),
        "counts": counts[keep].contiguous(),
    }
