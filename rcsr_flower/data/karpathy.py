"""Karpathy-split JSON (Flickr30K, COCO, the generated corpus) as an image-caption dataset."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from rcsr_flower.data.base import (
    ImageCaptionDataset,
    open_rgb,
    resolve_splits,
    split_names,
)

_ID_KEYS = ("image_id", "cocoid", "imgid")


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
        chosen = resolve_splits(split_names(split), available, f"Karpathy file {path}")
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
        return open_rgb(os.path.join(self.image_root, self._relpaths[i]))

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
