"""The frozen prefix of a CLIP tower, computed once and replayed (§2).

Adapters sit *after* their block (``h ← block_i(h); h ← h + a_i(h)``), so with adapters on
blocks ``f..n-1`` everything up to the output of block ``f`` — embeddings, pre-norm and
blocks ``0..f`` — never changes: it depends on the image or caption alone. A node computes
those hidden states once (:func:`image_prefix`, :func:`text_prefix`) and trains from
them: :func:`replay` swaps the prefix modules of the Hugging Face tower for stand-ins
that hand the cached states to the adapter of block ``f``; the blocks after it, the final
norm, pooling and projection are the model's own code. Embeddings equal the uncached
path up to float rounding (tested); a forward costs ``n-1-f`` blocks instead of ``n``.

Captions are stored ragged (each at its own length), so the cache costs what the tokens
cost, not the tower's full context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rcsr_flower.backbones.adapters import model_lock


@dataclass
class TowerPrefix:
    """Hidden states after block ``block`` (before its adapter) of many inputs.

    Images: ``hidden [N, S, W]``. Captions: ragged, ``hidden [Σ len, W]`` with
    ``start``/``length`` per caption and its ``input_ids`` (for the end-of-text pooling).
    ``row[i]`` is the first caption of item ``i`` (its captions are rows ``row[i]..``).
    """

    tower: str  # "vision" | "text"
    block: int
    hidden: torch.Tensor
    start: torch.Tensor | None = None  # [M] captions: offset into hidden
    length: torch.Tensor | None = None  # [M]
    input_ids: torch.Tensor | None = None  # [Σ len] captions: token ids, ragged like hidden
    row: torch.Tensor | None = None  # [N + 1] captions: first caption row of each item

    @property
    def nbytes(self) -> int:
        tensors = (self.hidden, self.start, self.length, self.input_ids, self.row)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        names = ("hidden", "start", "length", "input_ids", "row")
        return {n: getattr(self, n).contiguous() for n in names if getattr(self, n) is not None}

    @classmethod
    def from_tensors(cls, tower: str, block: int, t: dict[str, torch.Tensor]) -> TowerPrefix:
        return cls(tower, block, **t)

    # ------------------------------------------------------------------ batches
    def images(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hidden[idx]

    def captions(
        self, rows: Sequence[int], pad_id: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(hidden [B, T, W], tokens)`` of caption ``rows``, right-padded to the batch's
        longest as ``Backbone.tokenize`` pads (ids with ``pad_id``; hidden states with
        zeros: padding is masked as keys and never pooled, so its values do not matter)."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.long)
        lengths = self.length[rows_t]
        width = int(lengths.max())
        b = len(rows_t)
        hidden = self.hidden.new_zeros(b, width, self.hidden.shape[-1])
        ids = torch.full((b, width), pad_id, dtype=self.input_ids.dtype)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, (s, n) in enumerate(zip(self.start[rows_t].tolist(), lengths.tolist(), strict=True)):
            hidden[i, :n] = self.hidden[s : s + n]
            ids[i, :n] = self.input_ids[s : s + n]
            mask[i, :n] = 1
        return hidden, {"input_ids": ids, "attention_mask": mask}


class _Cached(nn.Module):
    """Stands in for a tower's embeddings: returns the cached hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _PassThrough(nn.Module):
    """Stands in for a frozen block of the prefix (and the vision pre-norm)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def tower_module(model: nn.Module, tower: str) -> nn.Module:
    return model.vision_model if tower == "vision" else model.text_model


@contextlib.contextmanager
def replay(model: nn.Module, tower: str, block: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, the tower's forward starts from ``hidden`` = the output of block
    ``block``: its embeddings (and vision pre-norm) return it, blocks ``0..block`` pass it
    through. Forward hooks on those blocks (the adapters of :func:`adapted`, entered
    *inside* this context) still run on the stand-ins, in the same place."""
    sub = tower_module(model, tower)
    layers = sub.encoder.layers
    with model_lock(model):  # a backbone is shared per process
        saved_layers = [layers[i] for i in range(block + 1)]
        saved_embeddings = sub.embeddings
        saved_norm = getattr(sub, "pre_layrnorm", None)
        try:
            sub.embeddings = _Cached(hidden)
            if saved_norm is not None:
                sub.pre_layrnorm = _PassThrough()
            for i in range(block + 1):
                layers[i] = _PassThrough()
            yield
        finally:
            sub.embeddings = saved_embeddings
            if saved_norm is not None:
                sub.pre_layrnorm = saved_norm
            for i, layer in enumerate(saved_layers):
                layers[i] = layer


class _Captured(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _run_to_block(model: nn.Module, tower: str, block: int, forward: Callable[[], None]):
    """Run ``forward`` only up to block ``block`` and return that block's output."""

    def stop(_module, _inputs, output):
        raise _Captured(output[0] if isinstance(output, tuple) else output)

    with model_lock(model):  # the hook would stop another thread's forward too
        handle = tower_module(model, tower).encoder.layers[block].register_forward_hook(stop)
        try:
            forward()
        except _Captured as captured:
            return captured.value
        finally:
            handle.remove()
    raise RuntimeError(f"the {tower} tower never reached block {block}")


@torch.no_grad()
def block_output(
    backbone, tower: str, block: int, inputs: torch.Tensor | dict[str, torch.Tensor]
) -> torch.Tensor:
    """The output of block ``block`` of ``tower`` (no adapters) for one batch: ``inputs``
    are pixels (vision) or ``Backbone.tokenize`` output (text). On the backbone's device."""
    model, device = backbone.model, backbone.device
    if tower == "vision":

        def forward() -> None:
            model.vision_model(pixel_values=inputs.to(device))

    else:

        def forward() -> None:
            model.text_model(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device),
            )

    with backbone._autocast():
        return _run_to_block(model, tower, block, forward)


@torch.no_grad()
def image_prefix(backbone, pixels: torch.Tensor, block: int, batch_size: int = 256) -> TowerPrefix:
    """The vision tower's frozen prefix of every image (no adapters), on the CPU."""
    parts = [block_output(backbone, "vision", block, b).cpu() for b in pixels.split(batch_size)]
    return TowerPrefix("vision", block, torch.cat(parts))


@torch.no_grad()
def text_prefix(
    backbone, captions: Sequence[list[str]], block: int, batch_size: int = 256
) -> TowerPrefix:
    """The text tower's frozen prefix of every caption of every item, ragged, on the CPU."""
    flat = [c for caps in captions for c in caps]
    row = torch.tensor([0, *torch.tensor([len(c) for c in captions]).cumsum(0).tolist()])
    hidden, ids, lengths = [], [], []
    for _, tokens in backbone.text_batches(flat, batch_size):
        out = block_output(backbone, "text", block, tokens).cpu()
        n = tokens["attention_mask"].sum(1)
        for i, k in enumerate(n.tolist()):
            hidden.append(out[i, :k])
            ids.append(tokens["input_ids"][i, :k])
        lengths.append(n)
    length = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.long)
    start = torch.cat([torch.zeros(1, dtype=torch.long), length.cumsum(0)[:-1]])[: len(length)]
    width = backbone.model.config.text_config.hidden_size
    return TowerPrefix(
        "text",
        block,
        torch.cat(hidden) if hidden else torch.zeros(0, width),
        start=start,
        length=length,
        input_ids=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
        row=row,
    )
