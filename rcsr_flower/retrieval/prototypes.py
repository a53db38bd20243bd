"""The prototype bank of §3: ``C`` paired semantic slots plus global prototypes.

``P_I, P_T ∈ R^{C×d}`` anchor unimodal clients to the shared cross-modal space (an
image is pulled toward the *text* prototype of its slot); ``g_I, g_T`` are the global
image/text prototypes that feed the router, as in the authors' code (``C = 1`` is
theirs). Pure tensor code: the strategy and clients exchange the bank as arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@dataclass
class SlotStats:
    """One client's per-slot embedding sums and counts, per available modality."""

    image_sum: torch.Tensor | None  # [C, d]
    image_count: torch.Tensor | None  # [C]
    text_sum: torch.Tensor | None
    text_count: torch.Tensor | None


@dataclass
class PrototypeBank:
    image: torch.Tensor  # P_I [C, d], rows normalised
    text: torch.Tensor  # P_T [C, d]
    g_image: torch.Tensor  # g_I [d]
    g_text: torch.Tensor  # g_T [d]

    @property
    def slots(self) -> int:
        return int(self.image.shape[0])

    # ------------------------------------------------------------------ bootstrap
    @classmethod
    def bootstrap(
        cls,
        image_means: Sequence[torch.Tensor],
        text_means: Sequence[torch.Tensor],
        counts: Sequence[torch.Tensor],
        num_slots: int,
        seed: int = 0,
    ) -> PrototypeBank:
        """Count-weighted k-means over the paired clients' joint group centroids.

        Each paired client sent, per local group, its image mean, text mean and count.
        Fewer groups than ``num_slots`` gives that many slots.
        """
        from sklearn.cluster import KMeans

        if not image_means:
            raise ValueError(
                "cross-modal anchoring needs at least one paired client: no client holding "
                "both images and captions answered the bootstrap round (lower missing-rate)"
            )
        img = torch.cat(list(image_means)).double()
        txt = torch.cat(list(text_means)).double()
        cnt = torch.cat(list(counts)).double()
        keep = cnt > 0
        img, txt, cnt = img[keep], txt[keep], cnt[keep]
        joint = normalize(img + txt).numpy()
        k = min(num_slots, len(joint))
        labels = (
            KMeans(n_clusters=k, n_init=4, random_state=seed)
            .fit(joint, sample_weight=cnt.numpy())
            .labels_
        )
        onehot = torch.zeros(len(joint), k, dtype=torch.float64)
        onehot[torch.arange(len(joint)), torch.as_tensor(labels)] = 1.0
        weighted = onehot * cnt[:, None]
        p_img = normalize(weighted.T @ img)
        p_txt = normalize(weighted.T @ txt)
        mass = weighted.sum(0)
        return cls(
            image=p_img.float(),
            text=p_txt.float(),
            g_image=normalize(mass @ p_img).float(),
            g_text=normalize(mass @ p_txt).float(),
        )

    # ------------------------------------------------------------------ server update
    def update(
        self,
        weights: Sequence[float],
        stats: Sequence[SlotStats],
        client_image: Sequence[torch.Tensor | None],
        client_text: Sequence[torch.Tensor | None],
        momentum: float = 0.95,
    ) -> None:
        """§3 server update with the fused weights ``w``.

        Per modality and slot with mass: ``P[c] <- normalize(m·P[c] + (1-m)·mean_c)``,
        ``mean_c`` the w-and-count-weighted mean of the clients' slot means; and
        ``g <- normalize(m·g + (1-m)·Σ_k w_k p_k)`` over the clients that have the
        modality, their weights renormalised (ours). A modality is updated only from
        clients that have it.
        """
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        for side in ("image", "text"):
            sums = [getattr(s, f"{side}_sum") for s in stats]
            counts = [getattr(s, f"{side}_count") for s in stats]
            holders = [
                i
                for i, (s, c) in enumerate(zip(sums, counts, strict=True))
                if s is not None and c is not None
            ]
            if not holders:
                continue
            num = sum(w[i] * sums[i].double() for i in holders)
            den = sum(w[i] * counts[i].double() for i in holders)
            has_mass = den > 0
            mean = num / den.clamp_min(1e-12)[:, None]
            bank = getattr(self, side).double()
            new = normalize(momentum * bank + (1 - momentum) * mean)
            bank = torch.where(has_mass[:, None], new, bank)
            setattr(self, side, bank.float())

            protos = client_image if side == "image" else client_text
            owners = [i for i in holders if protos[i] is not None]
            if owners:
                wo = w[owners] / w[owners].sum()
                p = sum(wo[j] * protos[i].double() for j, i in enumerate(owners))
                g = getattr(self, f"g_{side}").double()
                setattr(self, f"g_{side}", normalize(momentum * g + (1 - momentum) * p).float())

    # ------------------------------------------------------------------ consistency
    def retrieval_consistency(self, stats: SlotStats) -> float:
        """``r_k``: the fraction of the client's non-empty slots whose slot mean, on a
        side the client has, retrieves the matching slot of the other side as top-1
        (averaged over both sides for paired clients) (ours)."""
        scores = []
        for side, other in (("image", self.text), ("text", self.image)):
            s, c = getattr(stats, f"{side}_sum"), getattr(stats, f"{side}_count")
            if s is None or c is None or not bool((c > 0).any()):
                continue
            slots = torch.nonzero(c > 0).squeeze(1)
            means = normalize(s[slots].float())
            hits = (means @ other.T).argmax(1) == slots
            scores.append(float(hits.float().mean()))
        return float(np.mean(scores)) if scores else 0.0

    # ------------------------------------------------------------------ transport
    def to(self, device: torch.device | str) -> PrototypeBank:
        return PrototypeBank(
            self.image.to(device),
            self.text.to(device),
            self.g_image.to(device),
            self.g_text.to(device),
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "image": self.image,
            "text": self.text,
            "g_image": self.g_image,
            "g_text": self.g_text,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> PrototypeBank:
        missing = {"image", "text", "g_image", "g_text"} - set(t)
        if missing:
            raise ValueError(f"prototype bank is missing {sorted(missing)}")
        return cls(
            image=t["image"].float(),
            text=t["text"].float(),
            g_image=t["g_image"].float(),
            g_text=t["g_text"].float(),
        )
