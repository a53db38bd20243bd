"""One image-caption dataset abstraction over every source the project reads.

Flickr30K / COCO (Karpathy JSON), a local Hugging Face dataset (``save_to_disk`` directory or
parquet / JSON-lines files) and the project's generated corpus (Karpathy layout plus
``attributes``) all end up as an :class:`ImageCaptionDataset`, so the partitioner, the
embedding cache and the evaluation code have exactly one code path.

Two rules the rest of the package relies on:

* images are decoded lazily, only by :meth:`ImageCaptionDataset.image` (and ``__getitem__``);
  :meth:`ImageCaptionDataset.captions` never opens an image, so embedding every caption of
  COCO for the semantic partition does not decode 113k JPEGs;
* broken input fails at construction with one message that names the file, the problem and
  the fix, not later inside a training round.

Split names: Karpathy's COCO file has a ``restval`` split that the standard protocol counts as
training data, so ``split="train"`` selects ``train`` *and* ``restval`` wherever ``restval``
exists (Karpathy files and HF split columns / split names alike). ``"train+val"`` or a list
selects several splits; ``val`` and ``validation`` are accepted for each other.

Where each part lives: :mod:`.base` (the abstraction, split names, image decoding),
:mod:`.karpathy` and :mod:`.hf_local` (the two readers); this module chooses between them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rcsr_flower.data.base import Example, ImageCaptionDataset, SubsetDataset
from rcsr_flower.data.hf_local import (
    HFImageCaptionDataset,
    find_files,
    is_saved_hf_dir,
    not_local_message,
)
from rcsr_flower.data.karpathy import KarpathyDataset

__all__ = [
    "Example",
    "HFImageCaptionDataset",
    "ImageCaptionDataset",
    "KarpathyDataset",
    "SubsetDataset",
    "open_dataset",
]

FORMATS = ("auto", "karpathy", "hf")


def open_dataset(
    source: str | os.PathLike,
    split: str | Sequence[str],
    *,
    fmt: str = "auto",
    image_root: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str | None = None,
) -> ImageCaptionDataset:
    """Open a local dataset of any supported kind (the run config's dataset settings).

    ``fmt="auto"``: a ``.json`` file is Karpathy; a directory with ``dataset_dict.json`` /
    ``state.json`` (or ``dataset_info.json`` plus arrow files) is a ``save_to_disk`` dataset;
    a directory holding one Karpathy ``dataset*.json`` is Karpathy; parquet / JSON-lines files
    are read with the ``datasets`` parquet / json builder. ``image_root`` applies to Karpathy
    only (``None`` or ``""``: next to the JSON).
    """
    if fmt not in FORMATS:
        raise ValueError(f"dataset-format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(not_local_message(source))

    def karpathy(p: Path) -> KarpathyDataset:
        return KarpathyDataset(p, split, image_root=image_root)

    def hf() -> HFImageCaptionDataset:
        if not isinstance(split, str):
            raise ValueError("for a Hugging Face dataset pass split as a string ('a+b' for two)")
        return HFImageCaptionDataset(path, split, image_column, caption_column, split_column)

    if fmt == "hf":
        return hf()
    if path.is_file():
        if fmt == "karpathy" or path.suffix.lower() == ".json":
            return karpathy(path)
        return hf()
    if fmt == "auto" and is_saved_hf_dir(path):
        return hf()
    candidates = sorted(path.glob("dataset*.json"))
    candidates = [p for p in candidates if p.name != "dataset_info.json"]
    if len(candidates) == 1:
        return karpathy(candidates[0])
    if len(candidates) > 1:
        raise ValueError(
            f"{path} holds several Karpathy JSON files ({', '.join(p.name for p in candidates)});"
            " pass the one you want as the dataset path"
        )
    if fmt == "karpathy":
        raise FileNotFoundError(
            f"no Karpathy JSON (dataset*.json) in {path}; pass the JSON file itself"
        )
    if find_files(path, (".parquet", ".jsonl")):
        return hf()
    raise ValueError(
        f"cannot tell the format of {path}: expected a Karpathy dataset*.json, a save_to_disk "
        "directory (dataset_dict.json / state.json) or parquet / JSON-lines files; "
        "set dataset-format explicitly if it is one of those"
    )
