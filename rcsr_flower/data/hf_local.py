"""A local Hugging Face dataset (``save_to_disk`` directory, parquet or JSON-lines files)
as an image-caption dataset. Hub ids are not resolved here: the project runs offline."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from rcsr_flower.data.base import (
    SPLIT_ALIASES,
    ImageCaptionDataset,
    describe_counts,
    resolve_splits,
    split_names,
    to_rgb,
)

if TYPE_CHECKING:
    import datasets as hf_datasets

_HF_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_HF_ID_COLUMNS = ("image_id", "img_id", "filename", "id")


class HFImageCaptionDataset(ImageCaptionDataset):
    """A local Hugging Face dataset: ``save_to_disk`` directory, parquet or JSON-lines files.

    The image column may hold PIL images (``datasets.Image`` feature), ``{"bytes", "path"}``
    dicts, bytes or paths; the caption column a list of strings or one string. The split is a
    DatasetDict key, or a value of ``split_column`` (default: a column named ``split`` if the
    split is not a key), as in ``AnyModal/flickr30k``-style dumps; ``split="all"`` takes every
    row of a dataset without splits. Hub ids are not resolved here (offline project).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        image_column: str = "image",
        caption_column: str = "caption",
        split_column: str | None = None,
    ) -> None:
        src = Path(path).expanduser()
        if not src.exists():
            raise FileNotFoundError(not_local_message(path))
        obj = _load_hf_local(src)
        ds, rows, split_label = _select_hf_split(obj, split, split_column, src)
        missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"Hugging Face dataset {src} has no column {missing[0]!r}; columns that exist: "
                f"{', '.join(ds.column_names)}. Pass image_column= / caption_column= "
                "(run config: image-column / caption-column), the dataset's image and caption "
                "column names."
            )
        self.path = src
        self.split = split_label
        self.image_column = image_column
        self.caption_column = caption_column
        self._ds = ds
        self._rows = rows
        self._image_view = ds.select_columns([image_column])
        self._caption_cache: list | None = None  # whole caption column, read on first use
        id_col = next((c for c in _HF_ID_COLUMNS if c in ds.column_names), None)
        self._id_view = ds.select_columns([id_col]) if id_col else None
        self._id_column = id_col

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.split}"

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._ds)

    def _row(self, i: int) -> int:
        return self._rows[i] if self._rows is not None else i

    def _captions(self, i: int) -> list[str]:
        if self._caption_cache is None:
            # One columnar read (fast) instead of per-row access; no image column touched.
            col = self.caption_column
            self._caption_cache = self._ds.select_columns([col])[:][col]
        row = self._row(i)
        value = self._caption_cache[row]
        caps = [value] if isinstance(value, str) else value
        if not isinstance(caps, (list, tuple)) or not all(isinstance(c, str) for c in caps):
            raise ValueError(
                f"{self.path}: row {row} of caption column {self.caption_column!r} holds a "
                f"{type(value).__name__}; expected a string or a list of strings"
            )
        caps = [c.strip() for c in caps if c.strip()]
        if not caps:
            raise ValueError(
                f"{self.path}: row {row} has no captions in column {self.caption_column!r}"
            )
        return caps

    def _image(self, i: int) -> Image.Image:
        row = self._row(i)
        value = self._image_view[row][self.image_column]
        return to_rgb(value, f"{self.path}: row {row} column {self.image_column!r}")

    def _image_id(self, i: int) -> str:
        row = self._row(i)
        if self._id_view is None:
            return str(row)
        return str(self._id_view[row][self._id_column])


def not_local_message(source: str | os.PathLike) -> str:
    return (
        f"{os.fspath(source)!r} is not a local dataset path (no such file or directory). "
        "Hub ids are not downloaded by this module: save the dataset locally first "
        "(datasets.load_dataset(ID).save_to_disk(DIR)) and pass DIR, or pass a Karpathy JSON "
        "file (dataset_flickr30k.json / dataset_coco.json)."
    )


def _load_hf_local(src: Path) -> hf_datasets.Dataset | hf_datasets.DatasetDict:
    import datasets

    if src.is_dir():
        if is_saved_hf_dir(src):
            return datasets.load_from_disk(os.fspath(src))
        for builder, suffixes in (("parquet", (".parquet",)), ("json", (".jsonl", ".json"))):
            if find_files(src, suffixes):
                # The builder infers splits from file names (train-*.parquet, data/test-*, ...).
                return datasets.load_dataset(builder, data_dir=os.fspath(src))
        raise ValueError(
            f"{src} is not a Hugging Face dataset directory: no dataset_dict.json/state.json "
            "(save_to_disk output), parquet or JSON-lines files found"
        )
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(src.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{src}: cannot read a Hugging Face dataset from a {src.suffix or 'suffix-less'} "
            "file; pass a save_to_disk directory, a parquet / JSON-lines file or a directory"
        )
    # A single file carries no split of its own: use its split column or split="all".
    return datasets.load_dataset(builder, data_files=[os.fspath(src)], split="train")


def is_saved_hf_dir(d: Path) -> bool:
    if any((d / m).is_file() for m in _HF_SAVED_MARKERS):
        return True
    return (d / "dataset_info.json").is_file() and any(d.glob("*.arrow"))


def find_files(d: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _select_hf_split(
    obj: hf_datasets.Dataset | hf_datasets.DatasetDict,
    split: str,
    split_column: str | None,
    src: Path,
) -> tuple[hf_datasets.Dataset, list[int] | None, str]:
    """-> (dataset, selected row indices or None for all rows, split label)."""
    import datasets

    names = split_names(split)
    label = "+".join(names)
    if isinstance(obj, datasets.DatasetDict):
        keys = Counter({k: len(v) for k, v in obj.items()})
        if names == ["all"]:
            return _concat(list(obj.values())), None, "all"
        resolvable = all(n in keys or SPLIT_ALIASES.get(n) in keys or n == "restval" for n in names)
        if split_column is None and resolvable:
            chosen = resolve_splits(names, keys, f"Hugging Face dataset {src}")
            return _concat([obj[k] for k in sorted(chosen)]), None, label
        base = _concat(list(obj.values()))
        if split_column is None and "split" not in base.column_names:
            raise ValueError(
                f"Hugging Face dataset {src} has no split {label!r}; splits that exist: "
                f"{describe_counts(keys)}. Pass one of those, or split_column= if a column "
                "holds the split names."
            )
    else:
        base = obj
        if names == ["all"]:
            return base, None, "all"
        if split_column is None and "split" not in base.column_names:
            raise ValueError(
                f"Hugging Face dataset {src} is a single dataset without splits and without a "
                "'split' column; pass split_column= (the column holding split names) or "
                "split='all' to use every row"
            )
    column = split_column or "split"
    if column not in base.column_names:
        raise ValueError(
            f"Hugging Face dataset {src} has no split column {column!r}; columns that exist: "
            f"{', '.join(base.column_names)}"
        )
    values = base.select_columns([column])[:][column]
    where = f"split column {column!r}"
    if isinstance(obj, datasets.DatasetDict):
        where = f"DatasetDict splits {', '.join(obj)}; {where}"
    where = f"Hugging Face dataset {src} ({where})"
    chosen = resolve_splits(names, Counter(values), where)
    rows = [r for r, v in enumerate(values) if v in chosen]
    return base, rows, label


def _concat(parts: list[hf_datasets.Dataset]) -> hf_datasets.Dataset:
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
