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
"""

from __future__ import annotations

import abc
import io
import json
import operator
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import datasets as hf_datasets

__all__ = [
    "Example",
    "HFImageCaptionDataset",
    "ImageCaptionDataset",
    "KarpathyDataset",
    "SubsetDataset",
    "open_dataset",
]

FORMATS = ("auto", "karpathy", "hf")
_HF_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_SPLIT_ALIASES = {"val": "validation", "validation": "val"}
_ID_KEYS = ("image_id", "cocoid", "imgid")
_HF_ID_COLUMNS = ("image_id", "img_id", "filename", "id")


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


def _split_names(split: str | Sequence[str]) -> list[str]:
    """``"train"``, ``"train+restval"`` or ``["train", "restval"]`` -> list of names."""
    parts = split.split("+") if isinstance(split, str) else list(split)
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError(
            f"split must be a split name such as 'train', 'a+b' or a list of names, got {split!r}"
        )
    return list(dict.fromkeys(p.strip() for p in parts))


def _resolve_splits(requested: list[str], available: Counter, where: str) -> set[str]:
    """Map requested names onto existing ones (aliases, restval in train) or raise."""
    chosen: set[str] = set()
    for name in requested:
        if name in available:
            chosen.add(name)
        elif _SPLIT_ALIASES.get(name) in available:
            chosen.add(_SPLIT_ALIASES[name])
        elif name != "restval":  # absent restval (Flickr30K) is harmless
            raise ValueError(
                f"{where} has no items in split {name!r}; splits that exist: "
                f"{_describe_counts(available)}. Pass one of those "
                "(COCO's 'restval' is included in 'train' automatically)."
            )
    if "train" in chosen and "restval" in available:
        chosen.add("restval")
    if not chosen:
        raise ValueError(
            f"{where} has no items in split {'+'.join(requested)!r}; splits that exist: "
            f"{_describe_counts(available)}."
        )
    return chosen


def _describe_counts(counts: Counter) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{k!r} ({v})" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))


# --------------------------------------------------------------------------------------------
# Image decoding


def _open_rgb(path: str) -> Image.Image:
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


def _to_rgb(value: Any, where: str) -> Image.Image:
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
        return _open_rgb(os.fspath(value))
    raise ValueError(
        f"{where}: cannot turn a {type(value).__name__} into an image "
        "(expected a datasets Image feature, a {'bytes','path'} dict, bytes or a path)"
    )


# --------------------------------------------------------------------------------------------
# Karpathy JSON


class KarpathyDataset(ImageCaptionDataset):
    """Karpathy-split JSON (Flickr30K, COCO, the generated corpus).

    ``image_root`` defaults to the JSON's directory; an entry's image is
    ``image_root / filepath / filename`` (``filepath`` is COCO's ``train2014``/``val2014`` or the
    generated corpus' ``images``), or ``image_root / filename`` without ``filepath``
    (Flickr30K: pass ``image_root=.../flickr30k_images``). ``split="train"`` includes
    ``restval`` when the file has it (COCO Karpathy protocol).
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        split: str | Sequence[str] = "train",
        image_root: str | os.PathLike | None = None,
        check_files: bool = True,
    ) -> None:
        path = Path(json_path).expanduser()
        entries = _read_karpathy_entries(path)
        parsed = [_parse_entry(e, k, path) for k, e in enumerate(entries)]
        available = Counter(p[2] for p in parsed)
        chosen = _resolve_splits(_split_names(split), available, f"Karpathy file {path}")
        selected = [p for p in parsed if p[2] in chosen]

        root = Path(image_root).expanduser() if image_root not in (None, "") else path.parent
        self.json_path = path
        self.image_root = root
        self.splits = tuple(sorted(chosen))
        self._relpaths = [p[0] for p in selected]
        self._caps = [p[1] for p in selected]
        self._ids = [p[3] for p in selected]
        self._attrs = [p[4] for p in selected]
        if check_files:
            self._check_files()

    @property
    def name(self) -> str:
        return f"{self.json_path.stem}:{'+'.join(self.splits)}"

    def __len__(self) -> int:
        return len(self._relpaths)

    def image_path(self, i: int) -> str:
        """Where item ``i``'s image file is expected."""
        return os.path.join(self.image_root, self._relpaths[self._index(i)])

    def _check_files(self) -> None:
        if not self.image_root.is_dir():
            raise FileNotFoundError(
                f"image root {self.image_root} for {self.json_path} is not a directory; pass "
                "the directory that holds the images as image_root (the data-dir setting; "
                "Flickr30K: .../flickr30k_images, COCO: the folder with train2014/ and val2014/)"
            )
        root = os.fspath(self.image_root)
        missing = [r for r in self._relpaths if not os.path.exists(os.path.join(root, r))]
        if missing:
            shown = ", ".join(missing[:5])
            raise FileNotFoundError(
                f"{len(missing)} of {len(self._relpaths)} image files of split "
                f"{'+'.join(self.splits)!r} in {self.json_path} are missing under image root "
                f"{root} (first {min(5, len(missing))}: {shown}). Pass the directory that "
                "holds the images as image_root (the data-dir setting; Flickr30K: "
                ".../flickr30k_images, COCO: the folder with train2014/ and val2014/)."
            )

    def _captions(self, i: int) -> list[str]:
        return list(self._caps[i])

    def _image(self, i: int) -> Image.Image:
        return _open_rgb(os.path.join(self.image_root, self._relpaths[i]))

    def _attributes(self, i: int) -> dict | None:
        return self._attrs[i]

    def _image_id(self, i: int) -> str:
        return self._ids[i]


def _read_karpathy_entries(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(
            f"Karpathy JSON {path} does not exist; pass the path of dataset_flickr30k.json / "
            "dataset_coco.json (or the generated corpus' JSON)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); expected a Karpathy-split file like "
            "dataset_flickr30k.json"
        ) from e
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(
            f"{path} has no top-level 'images' key; expected a Karpathy-split file "
            '({"images": [{"filename", "split", "sentences": [{"raw"}]}, ...]}). '
            "For a Hugging Face dataset use dataset-format='hf'."
        )
    if not isinstance(data["images"], list):
        raise ValueError(f"{path}: 'images' must be a list, got {type(data['images']).__name__}")
    return data["images"]


def _parse_entry(
    entry: Any, k: int, path: Path
) -> tuple[str, tuple[str, ...], str, str, dict | None]:
    """-> (relative image path, captions, split, image id, attributes)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: images[{k}] is a {type(entry).__name__}, expected an object")
    for key in ("filename", "sentences", "split"):
        if key not in entry:
            raise ValueError(
                f"{path}: images[{k}] is missing the key {key!r} (every entry needs "
                "'filename', 'split' and 'sentences'); is this a Karpathy-split file?"
            )
    filename, split, sentences = entry["filename"], entry["split"], entry["sentences"]
    if not isinstance(filename, str) or not filename:
        raise ValueError(f"{path}: images[{k}] 'filename' must be a non-empty string")
    if not isinstance(split, str):
        raise ValueError(f"{path}: images[{k}] ({filename}) 'split' must be a string")
    if not isinstance(sentences, list):
        raise ValueError(f"{path}: images[{k}] ({filename}) 'sentences' must be a list")
    caps = []
    for s in sentences:
        text = s.get("raw", " ".join(s.get("tokens", []))) if isinstance(s, dict) else s
        if not isinstance(text, str):
            raise ValueError(
                f"{path}: images[{k}] ({filename}) has a sentence that is not "
                '{"raw": str} or a string'
            )
        if text.strip():
            caps.append(text.strip())
    if not caps:
        raise ValueError(
            f"{path}: images[{k}] ({filename}) has no captions; every image needs at least "
            "one sentence with a non-empty 'raw' text"
        )
    filepath = entry.get("filepath")
    rel = os.path.join(filepath, filename) if filepath else filename
    image_id = next((str(entry[key]) for key in _ID_KEYS if key in entry), rel)
    attrs = entry.get("attributes")
    if attrs is not None and not isinstance(attrs, dict):
        raise ValueError(f"{path}: images[{k}] ({filename}) 'attributes' must be an object")
    return rel, tuple(caps), split, image_id, attrs


# --------------------------------------------------------------------------------------------
# Hugging Face datasets (local only)


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
            raise FileNotFoundError(_not_local_message(path))
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
        return _to_rgb(value, f"{self.path}: row {row} column {self.image_column!r}")

    def _image_id(self, i: int) -> str:
        row = self._row(i)
        if self._id_view is None:
            return str(row)
        return str(self._id_view[row][self._id_column])


def _not_local_message(source: str | os.PathLike) -> str:
    return (
        f"{os.fspath(source)!r} is not a local dataset path (no such file or directory). "
        "Hub ids are not downloaded by this module: save the dataset locally first "
        "(datasets.load_dataset(ID).save_to_disk(DIR)) and pass DIR, or pass a Karpathy JSON "
        "file (dataset_flickr30k.json / dataset_coco.json)."
    )


def _load_hf_local(src: Path) -> hf_datasets.Dataset | hf_datasets.DatasetDict:
    import datasets

    if src.is_dir():
        if _is_saved_hf_dir(src):
            return datasets.load_from_disk(os.fspath(src))
        for builder, suffixes in (("parquet", (".parquet",)), ("json", (".jsonl", ".json"))):
            if _find_files(src, suffixes):
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


def _is_saved_hf_dir(d: Path) -> bool:
    if any((d / m).is_file() for m in _HF_SAVED_MARKERS):
        return True
    return (d / "dataset_info.json").is_file() and any(d.glob("*.arrow"))


def _find_files(d: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _select_hf_split(
    obj: hf_datasets.Dataset | hf_datasets.DatasetDict,
    split: str,
    split_column: str | None,
    src: Path,
) -> tuple[hf_datasets.Dataset, list[int] | None, str]:
    """-> (dataset, selected row indices or None for all rows, split label)."""
    import datasets

    names = _split_names(split)
    label = "+".join(names)
    if isinstance(obj, datasets.DatasetDict):
        keys = Counter({k: len(v) for k, v in obj.items()})
        if names == ["all"]:
            return _concat(list(obj.values())), None, "all"
        resolvable = all(
            n in keys or _SPLIT_ALIASES.get(n) in keys or n == "restval" for n in names
        )
        if split_column is None and resolvable:
            chosen = _resolve_splits(names, keys, f"Hugging Face dataset {src}")
            return _concat([obj[k] for k in sorted(chosen)]), None, label
        base = _concat(list(obj.values()))
        if split_column is None and "split" not in base.column_names:
            raise ValueError(
                f"Hugging Face dataset {src} has no split {label!r}; splits that exist: "
                f"{_describe_counts(keys)}. Pass one of those, or split_column= if a column "
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
    chosen = _resolve_splits(names, Counter(values), where)
    rows = [r for r, v in enumerate(values) if v in chosen]
    return base, rows, label


def _concat(parts: list[hf_datasets.Dataset]) -> hf_datasets.Dataset:
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------------------------
# Entry point


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
        raise FileNotFoundError(_not_local_message(source))

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
    if fmt == "auto" and _is_saved_hf_dir(path):
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
    if _find_files(path, (".parquet", ".jsonl")):
        return hf()
    raise ValueError(
        f"cannot tell the format of {path}: expected a Karpathy dataset*.json, a save_to_disk "
        "directory (dataset_dict.json / state.json) or parquet / JSON-lines files; "
        "set dataset-format explicitly if it is one of those"
    )
