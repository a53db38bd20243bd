"""The dataset abstraction every source becomes, and what the readers share.

:class:`ImageCaptionDataset` (random access, lazy images, index checking once),
:class:`SubsetDataset` (a view), split-name resolution (aliases, COCO's ``restval`` in
``train``) and image decoding with errors that name the file and the fix. The readers
(:mod:`.karpathy`, :mod:`.hf_local`) build on these; :mod:`.datasets` picks one.
"""

from __future__ import annotations

import abc
import io
import operator
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

SPLIT_ALIASES = {"val": "validation", "validation": "val"}


@dataclass(frozen=True)
class Example:
    """One image with all of its captions (``attributes`` only for the generated corpus)."""

    image: Image.Image
    captions: list[str]
    attributes: dict | None
    image_id: str


class ImageCaptionDataset(abc.ABC):
    """Random-access image-caption pairs; subclasses implement the four abstract methods."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short human-readable name (source and split), used in logs and cache keys."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _captions(self, i: int) -> list[str]: ...

    @abc.abstractmethod
    def _image(self, i: int) -> Image.Image: ...

    def _attributes(self, i: int) -> dict | None:
        return None

    def _image_id(self, i: int) -> str:
        return str(i)

    # Public accessors: index checking lives here once, subclasses see valid indices only.
    def captions(self, i: int) -> list[str]:
        """All captions of item ``i``; never decodes an image."""
        return list(self._captions(self._index(i)))

    def image(self, i: int) -> Image.Image:
        """The RGB image of item ``i``, decoded now."""
        return self._image(self._index(i))

    def attributes(self, i: int) -> dict | None:
        """Generated-corpus attributes of item ``i`` (None for real datasets)."""
        attrs = self._attributes(self._index(i))
        return None if attrs is None else dict(attrs)

    def image_id(self, i: int) -> str:
        """A stable id of item ``i`` (dataset id where the source has one)."""
        return self._image_id(self._index(i))

    def __getitem__(self, i: int) -> Example:
        i = self._index(i)
        return Example(
            image=self._image(i),
            captions=list(self._captions(i)),
            attributes=self.attributes(i),
            image_id=self._image_id(i),
        )

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def subset(self, indices: Sequence[int]) -> ImageCaptionDataset:
        """A cheap view on ``indices`` (no copy, nothing decoded); views of views collapse."""
        return SubsetDataset(self, indices)

    def _index(self, i: int) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(
                f"{self.name}: index must be an integer, got {type(i).__name__}"
            ) from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} items")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)})"


class SubsetDataset(ImageCaptionDataset):
    """A view of ``base`` restricted to ``indices`` (order kept, duplicates allowed)."""

    def __init__(self, base: ImageCaptionDataset, indices: Sequence[int]) -> None:
        idx = tuple(base._index(i) for i in indices)
        if isinstance(base, SubsetDataset):  # collapse so access cost stays O(1)
            idx = tuple(base.indices[i] for i in idx)
            base = base.base
        self.base = base
        self.indices = idx

    @property
    def name(self) -> str:
        return f"{self.base.name}[subset:{len(self.indices)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def _captions(self, i: int) -> list[str]:
        return self.base._captions(self.indices[i])

    def _image(self, i: int) -> Image.Image:
        return self.base._image(self.indices[i])

    def _attributes(self, i: int) -> dict | None:
        return self.base._attributes(self.indices[i])

    def _image_id(self, i: int) -> str:
        return self.base._image_id(self.indices[i])


# --------------------------------------------------------------------------------------------
# Split names


def split_names(split: str | Sequence[str]) -> list[str]:
    """``"train"``, ``"train+restval"`` or ``["train", "restval"]`` -> list of names."""
    parts = split.split("+") if isinstance(split, str) else list(split)
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError(
            f"split must be a split name such as 'train', 'a+b' or a list of names, got {split!r}"
        )
    return list(dict.fromkeys(p.strip() for p in parts))


def resolve_splits(requested: list[str], available: Counter, where: str) -> set[str]:
    """Map requested names onto existing ones (aliases, restval in train) or raise."""
    chosen: set[str] = set()
    for name in requested:
        if name in available:
            chosen.add(name)
        elif SPLIT_ALIASES.get(name) in available:
            chosen.add(SPLIT_ALIASES[name])
        elif name != "restval":  # absent restval (Flickr30K) is harmless
            raise ValueError(
                f"{where} has no items in split {name!r}; splits that exist: "
                f"{describe_counts(available)}. Pass one of those "
                "(COCO's 'restval' is included in 'train' automatically)."
            )
    if "train" in chosen and "restval" in available:
        chosen.add("restval")
    if not chosen:
        raise ValueError(
            f"{where} has no items in split {'+'.join(requested)!r}; splits that exist: "
            f"{describe_counts(available)}."
        )
    return chosen


def describe_counts(counts: Counter) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{k!r} ({v})" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))


# --------------------------------------------------------------------------------------------
# Image decoding


def open_rgb(path: str) -> Image.Image:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"image file {path} does not exist; pass the directory that holds the images as "
            "image_root (the data-dir setting)"
        )
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, Image.UnidentifiedImageError) as e:
        raise ValueError(f"cannot decode image file {path}: {e}") from e


def to_rgb(value: Any, where: str) -> Image.Image:
    """PIL image, ``{"bytes", "path"}`` dict, raw bytes or a path -> RGB PIL image."""
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError(f"{where}: image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(value)) as im:
            return im.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        return open_rgb(os.fspath(value))
    raise ValueError(
        f"{where}: cannot turn a {type(value).__name__} into an image "
        "(expected a datasets Image feature, a {'bytes','path'} dict, bytes or a path)"
    )
