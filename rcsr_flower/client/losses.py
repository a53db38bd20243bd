"""Client losses of §4, pure functions of tensors.

- paired:     ``InfoNCE_sym(z_I, z_T; τ) + λ_align·L_proto + λ_stab·L_prox``
- image-only: ``λ_anchor·CE(softmax(z_I·P_Tᵀ/τ_p), s_I) + λ_stab·L_prox``
- text-only:  the mirror image.

``s`` is a sample's slot in the prototype bank, found on the side the client has;
anchoring pulls the embedding toward the *other* modality's prototype of that slot.

``anchoring-loss`` picks the anchoring term: ``"ce"`` is the literal CE above, whose optimum
sends every sample of a slot to one point (trained alone, as on a unimodal client's
personal adapters, it collapses the client's embeddings); ``"soft"`` (:func:`anchor_soft`)
keeps each sample's relation to the prototypes as it was at the round's start and moves
only the slots' centroids toward their cross-modal prototypes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def info_nce_sym(z_i: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over matched rows (row i of each side is a pair)."""
    logits = z_i @ z_t.T / temperature
    target = torch.arange(z_i.shape[0], device=z_i.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def assign_slots(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Nearest slot by cosine: ``argmax_c z·P[c]`` (inputs are normalised)."""
    return (z @ prototypes.T).argmax(dim=1)


def anchor_ce(
    z: torch.Tensor, other_prototypes: torch.Tensor, slots: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Prototype anchoring: CE of ``softmax(z·P_otherᵀ/τ_p)`` against the sample's slot."""
    return F.cross_entropy(z @ other_prototypes.T / temperature, slots)


def anchor_soft(
    z: torch.Tensor,
    z_teacher: torch.Tensor,
    other_prototypes: torch.Tensor,
    slots: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Anchoring that cannot collapse: ``KL(p⁰‖p) + Σ_c (n_c/n) CE(ẑ_c·P_otherᵀ/τ_p, c)``.

    ``p = softmax(z·P_otherᵀ/τ_p)`` per sample, ``p⁰`` the same for ``z_teacher`` (the
    embeddings under the round's starting adapters, no gradient); ``slots`` are assigned by
    the caller with the teacher's embeddings, ``ẑ_c = normalize(mean_{s=c} z)``. The KL term is
    zero (with zero gradient) at the teacher, so a sample may only move as far as its
    relation to the prototypes allows; the centroid term pulls each slot's *mean* across
    modalities, which a single point would satisfy no better than the spread-out slot.
    """
    z_teacher = z_teacher.detach()
    log_p = F.log_softmax(z @ other_prototypes.T / temperature, dim=1)
    log_p0 = F.log_softmax(z_teacher @ other_prototypes.T / temperature, dim=1)
    kl = F.kl_div(log_p, log_p0, log_target=True, reduction="batchmean")
    present, inverse, counts = torch.unique(slots, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(present), z.shape[1], dtype=z.dtype, device=z.device)
    centroids = F.normalize(sums.index_add(0, inverse, z), dim=1)
    per_slot = F.cross_entropy(
        centroids @ other_prototypes.T / temperature, present, reduction="none"
    )
    return kl + (per_slot * counts.to(z.dtype)).sum() / len(z)


def proto_alignment(
    z_i: torch.Tensor,
    z_t: torch.Tensor,
    p_image: torch.Tensor,
    p_text: torch.Tensor,
    temperature: float,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``L_proto`` on a paired batch: both anchoring terms, slots from the text side.

    With ``teacher = (z_I⁰, z_T⁰)`` (the round's starting adapters) it is the soft form of
    :func:`anchor_soft` on each side instead of the CE.
    """
    if teacher is not None:
        t_i, t_t = teacher
        slots = assign_slots(t_t, p_text)
        return anchor_soft(z_i, t_i, p_text, slots, temperature) + anchor_soft(
            z_t, t_t, p_image, slots, temperature
        )
    slots = assign_slots(z_t, p_text)
    return anchor_ce(z_i, p_text, slots, temperature) + anchor_ce(z_t, p_image, slots, temperature)


def prox(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``L_prox = ½‖θ_k − θ‖²`` against the round's global adapters."""
    terms = [((p - a.detach()) ** 2).sum() for p, a in zip(params, anchors, strict=True)]
    return 0.5 * torch.stack(terms).sum()
