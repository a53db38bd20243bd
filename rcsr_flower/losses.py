"""Client losses of SPEC §4, pure functions of tensors.

- paired:     ``InfoNCE_sym(z_I, z_T; τ) + λ_align·L_proto + λ_stab·L_prox``
- image-only: ``λ_anchor·CE(softmax(z_I·P_Tᵀ/τ_p), s_I) + λ_stab·L_prox``
- text-only:  the mirror image.

``s`` is a sample's slot in the prototype bank, found on the side the client has;
anchoring pulls the embedding toward the *other* modality's prototype of that slot.
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


def proto_alignment(
    z_i: torch.Tensor,
    z_t: torch.Tensor,
    p_image: torch.Tensor,
    p_text: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``L_proto`` on a paired batch: both anchoring terms, slots from the text side."""
    slots = assign_slots(z_t, p_text)
    return anchor_ce(z_i, p_text, slots, temperature) + anchor_ce(z_t, p_image, slots, temperature)


def prox(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``L_prox = ½‖θ_k − θ‖²`` against the round's global adapters."""
    terms = [((p - a.detach()) ** 2).sum() for p, a in zip(params, anchors, strict=True)]
    return 0.5 * torch.stack(terms).sum()
