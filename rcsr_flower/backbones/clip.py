"""The one model loader: a frozen Hugging Face ``CLIPModel`` + its tokenizer and processor.

Every backbone — ``openai/clip-vit-base-patch32``, a local directory, or the project's
embedded tiny CLIP — goes through ``CLIPModel.from_pretrained(name_or_path)`` and
``AutoTokenizer``/``CLIPImageProcessor``. The loaded backbone is cached per process
(Ray reuses actors across rounds in simulation), and everything here is frozen:
trainable state lives in :class:`~rcsr_flower.backbones.adapters.AdapterSet`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from rcsr_flower.backbones.adapters import AdapterSet, adapted
from rcsr_flower.backbones.prefix import replay
from rcsr_flower.config import EMBEDDED

log = logging.getLogger(__name__)

TOKEN_CACHE_SIZE = 500_000  # captions whose token ids a backbone keeps (COCO has 616,767)


class BackboneNotFoundError(RuntimeError):
    """The checkpoint is neither a local directory nor in the local Hugging Face cache."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count.

    For one-off work that everything else waits on (the semantic partition): a Ray
    actor is started with one thread, which would leave the machine's other cores idle.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def preprocess_images(image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """The checkpoint's own image preprocessing (resize, crop, normalise) of a batch.

    A free function of the processor alone, so ``DataLoader`` workers can run it without
    the model (see :func:`rcsr_flower.retrieval.evaluation.preprocess_split`).
    """
    out = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return out["pixel_values"]


@dataclass
class Backbone:
    """A frozen CLIP with the helpers every stage needs (tokenise, preprocess, embed)."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    device: torch.device
    name: str
    mixed_precision: bool = True  # bf16 autocast of the frozen towers on CUDA
    # caption -> its token ids (truncated, unpadded): a node's captions are tokenised once,
    # not every round (13 % of a client's evaluation here); cleared past TOKEN_CACHE_SIZE
    _token_ids: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def new_adapters(
        self, adapter_layers: str = "all", bottleneck: int = 64, init_std: float = 0.02
    ) -> AdapterSet:
        return AdapterSet.for_model(self.model, adapter_layers, bottleneck, init_std).to(
            self.device
        )

    # ------------------------------------------------------------------ inputs
    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pad to the batch's longest caption, not to 77: short captions cost less.

        The same tensors as the tokenizer's ``padding="longest"`` (tested), built from
        each caption's cached ids: the captions of a node's splits come back every round.
        """
        captions = list(captions)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if not captions or pad is None or self.tokenizer.padding_side != "right":
            tokens = self.tokenizer(
                captions,
                padding="longest",
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        ids = self.token_ids(captions)
        lengths = torch.tensor([len(x) for x in ids])
        mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        input_ids = torch.full(mask.shape, pad, dtype=torch.long)
        input_ids[mask] = torch.tensor([t for x in ids for t in x], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask.long()}

    def token_ids(self, captions: list[str]) -> list[list[int]]:
        """Each caption's token ids, truncated to the context, from the cache or tokenised."""
        cache = self._token_ids
        ids = [cache.get(c) for c in captions]
        missing = list(dict.fromkeys(c for c, x in zip(captions, ids, strict=True) if x is None))
        if missing:
            encoded = self.tokenizer(missing, truncation=True, max_length=self.max_text_length)
            new = dict(zip(missing, encoded["input_ids"], strict=True))
            if len(cache) + len(new) > TOKEN_CACHE_SIZE:
                cache.clear()
            cache.update(new)
            ids = [new[c] if x is None else x for c, x in zip(captions, ids, strict=True)]
        return ids

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The checkpoint's own image preprocessing (resize, crop, normalise)."""
        return preprocess_images(self.image_processor, images)

    # ------------------------------------------------------------------ towers
    def _autocast(self):
        enabled = self.mixed_precision and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """fp32 towers inside the block, also on CUDA.

        For results that different machines must agree on (the semantic partition each
        node computes for itself): bf16 rounding would move k-means borders between a CPU
        and a GPU node, fp32 leaves only last-bit differences.
        """
        saved, self.mixed_precision = self.mixed_precision, False
        try:
            yield
        finally:
            self.mixed_precision = saved

    def _start(self, tower: str, prefix_block: int | None, hidden: torch.Tensor | None):
        """Where the tower's forward starts: its input, or a cached frozen prefix."""
        if prefix_block is None:
            return contextlib.nullcontext()
        return replay(self.model, tower, prefix_block, hidden)

    def image_features(
        self,
        pixel_values: torch.Tensor,
        *adapters: AdapterSet | None,
        prefix_block: int | None = None,
    ) -> torch.Tensor:
        """L2-normalised ``z_I`` with the given adapter sets applied (summed).

        ``prefix_block``: ``pixel_values`` are instead the cached output of that block
        (:mod:`rcsr_flower.backbones.prefix`), and only the blocks after it run.
        """
        model = self.model
        x = pixel_values.to(self.device)
        with self._start("vision", prefix_block, x), adapted(model, *adapters), self._autocast():
            pooled = model.vision_model(pixel_values=x).pooler_output
            z = model.visual_projection(pooled)
        return torch.nn.functional.normalize(z.float(), dim=-1)

    def text_features(
        self,
        tokens: dict[str, torch.Tensor],
        *adapters: AdapterSet | None,
        prefix: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """L2-normalised ``z_T`` with the given adapter sets applied (summed).

        ``prefix = (block, hidden)``: start from the cached output of that block for these
        tokens (:mod:`rcsr_flower.backbones.prefix`); ``tokens`` still give the masks and
        the end-of-text position that is pooled.
        """
        model = self.model
        block, hidden = prefix if prefix is not None else (None, None)
        if hidden is not None:
            hidden = hidden.to(self.device)
        with self._start("text", block, hidden), adapted(model, *adapters), self._autocast():
            out = model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            z = model.text_projection(out.pooler_output)
        return torch.nn.functional.normalize(z.float(), dim=-1)

    # ------------------------------------------------------------------ batched, no grad
    @torch.no_grad()
    def embed_images(
        self,
        pixels: torch.Tensor,
        *adapters: AdapterSet | None,
        index: torch.Tensor | None = None,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """``z_I`` of ``pixels`` (or of ``pixels[index]``, gathered a batch at a time, so a
        subset is never copied whole), ``batch_size`` at a time, on the CPU."""
        order = torch.arange(len(pixels)) if index is None else index
        return torch.cat(
            [self.image_features(pixels[b], *adapters).cpu() for b in order.split(batch_size)]
        )

    def text_batches(
        self, captions: Sequence[str], batch_size: int = 256, by_length: bool = False
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """How :meth:`embed_texts` batches captions: ``(positions in captions, tokens)``
        per batch. One plan for the plain path, the training prefix and the evaluation's
        cached frozen prefix (``backbones.prefix``, :mod:`rcsr_flower.retrieval.evaluation`),
        so they run the very same batches. In input order a batch is tokenized only when it is due,
        so a partition's hundreds of thousands of captions are never tokenized at once."""
        captions = list(captions)
        n = len(captions)
        if not by_length or n <= batch_size:
            for start in range(0, n, batch_size):  # no batch at all for no captions
                idx = torch.arange(start, min(start + batch_size, n))
                yield idx, self.tokenize(captions[start : start + batch_size])
            return
        tokens = self.tokenize(captions)  # padded to the longest; each batch is trimmed
        lengths = tokens["attention_mask"].sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        for idx in order.split(batch_size):
            yield idx, {k: v[idx, : int(lengths[idx].max())] for k, v in tokens.items()}

    @torch.no_grad()
    def embed_texts(
        self,
        captions: Sequence[str],
        *adapters: AdapterSet | None,
        batch_size: int = 256,
        by_length: bool = False,
    ) -> torch.Tensor:
        """``z_T`` of many captions, ``batch_size`` at a time, on the CPU.

        ``by_length``: batch captions of similar length together (returned in the input
        order), so batches carry little padding: a third faster on the embedded test
        split (4.1 -> 2.7 s). Equal up to float rounding, not bit-identical, to input order,
        so it is for evaluation only: training statistics keep the input order.
        """
        captions = list(captions)
        return gather(
            (
                (idx, self.text_features(tokens, *adapters).cpu())
                for idx, tokens in self.text_batches(captions, batch_size, by_length)
            ),
            len(captions),
        )

    def embed_caption_lists(
        self,
        captions: Sequence[list[str]],
        *adapters: AdapterSet | None,
        batch_size: int = 256,
        by_length: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_T [M,d], owner [M])`` of every caption of every item; ``owner`` is its item."""
        flat = [c for caps in captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        z = self.embed_texts(flat, *adapters, batch_size=batch_size, by_length=by_length)
        return z, owner


def gather(parts: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """``n`` rows computed batch by batch as ``(positions, rows)``, back in input order;
    each batch is written as it comes, so only one batch's rows exist beside the result."""
    out = None
    for idx, z in parts:
        if out is None:
            out = z.new_empty(n, *z.shape[1:])
        out[idx] = z
    return out if out is not None else torch.empty(0)


_CACHE: dict[tuple[str, str, str], Backbone] = {}
_LOCK = threading.Lock()


def load_backbone(
    path: str,
    device: str | torch.device | None = None,
    *,
    name: str | None = None,
) -> Backbone:
    """Load (once per process) a frozen CLIP checkpoint by hub id or local directory.

    A run's ``model-name`` may also be ``"embedded"``, the project's tiny CLIP: that name
    is resolved (and the checkpoint put in the cache) by ``rcsr_flower.embedded.assets.load_model``,
    which stands above the backbones.
    """
    if path == EMBEDDED:
        raise ValueError(
            "load_backbone takes a hub id or a checkpoint directory; 'embedded' (the "
            "project's tiny CLIP) is loaded with rcsr_flower.embedded.assets.load_model('embedded')"
        )
    dev = torch.device(device) if device is not None else default_device()
    # the name is part of the key: it keys cached partitions (federation.partition_key),
    # so the same checkpoint asked for as "embedded" and by its path must not share one
    key = (str(Path(path).resolve()) if os.path.isdir(path) else path, str(dev), name or path)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(path, dev, name or path)
        return _CACHE[key]


def _load(path: str, device: torch.device, name: str) -> Backbone:
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per Ray actor and round is only noise
    try:
        model = CLIPModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = _load_image_processor(path)
    except OSError as exc:
        if os.path.isdir(path):
            raise BackboneNotFoundError(
                f"'{path}' is a directory but not a complete CLIP checkpoint ({exc}); it needs "
                "config.json, model.safetensors, tokenizer and preprocessor_config.json "
                "(save_pretrained writes them)"
            ) from None
        raise BackboneNotFoundError(
            f"could not fetch CLIP checkpoint '{path}': it is not a local directory and not in "
            "the local Hugging Face cache, and the hub could not be reached (offline?). "
            f"Download it on a machine with access (`hf download {path} --local-dir DIR`), "
            "copy DIR here and set model-name to that DIR (docs/reproducing.md)"
        ) from None
    model.requires_grad_(False).eval().to(device)
    log.info("loaded backbone %s on %s", name, device)
    return Backbone(model, tokenizer, processor, device, name)


def _load_image_processor(path: str):
    """The PIL/numpy CLIP processor: same numbers as the torchvision one, no torchvision.

    Imported by its own name, as transformers asks: the name ``CLIPImageProcessor`` means
    the torchvision backend since transformers 5, and without torchvision asking for it
    logs "requires torchvision (not installed); falling back to CLIPImageProcessorPil"
    in every process that loads a backbone (each ClientApp, the ServerApp) before it
    hands out this very class.
    """
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers < 5: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessorPil.from_pretrained(path)
