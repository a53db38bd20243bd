"""The semantic router (§5 step 2): client tokens -> aggregation weights.

``token -> MLP(→H, LayerNorm, GELU, →H) -> B self-attention blocks (no positional
encoding) -> linear -> softmax over the round's clients``. Without positions the
router is permutation-equivariant: reorder the clients and the weights reorder with
them. It knows nothing of the task: the task builds the tokens and the objective.
"""

from __future__ import annotations

import torch
from torch import nn


class SemanticRouter(nn.Module):
    def __init__(
        self,
        token_dim: int,
        hidden: int = 128,
        heads: int = 4,
        blocks: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.embed = nn.Sequential(
            nn.Linear(token_dim, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden,
                heads,
                dim_feedforward=4 * hidden,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [K, F]`` of the round's K clients -> weights ``[K]`` on the simplex."""
        if tokens.ndim != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(
                f"router tokens must be [K, {self.token_dim}], got {tuple(tokens.shape)}"
            )
        h = self.embed(tokens).unsqueeze(0)
        for block in self.blocks:
            h = block(h)
        return torch.softmax(self.head(h).squeeze(0).squeeze(-1), dim=0)


def entropy(w: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of a weight vector (nats)."""
    return -(w * torch.log(w.clamp_min(1e-12))).sum()


def fuse_weights(w_router: torch.Tensor, w_minimax: torch.Tensor) -> torch.Tensor:
    """§5 step 4: ``w = w_r ⊙ w_m / Σ``."""
    w = w_router * w_minimax
    total = w.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("fused weights vanish: router and minimax weights share no mass")
    return w / total
