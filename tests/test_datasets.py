"""The dataset abstraction: Karpathy JSON (Flickr30K / COCO / generated layouts) and local
Hugging Face datasets go through one API, decode images lazily and fail with clear messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from rcsr_flower.data.datasets import (
    Example,
    HFImageCaptionDataset,
    ImageCaptionDataset,
    KarpathyDataset,
    open_dataset,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path, format="PNG")  # lossless, whatever the name


def _entry(filename: str, split: str, caps: list[str], **extra) -> dict:
    sentences = [{"raw": c, "tokens": c.lower().split()} for c in caps]
    return {"filename": filename, "split": split, "sentences": sentences, **extra}


def _write_json(path: Path, images: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "test"}))
    return path


@pytest.fixture
def flickr(tmp_path: Path) -> tuple[Path, Path]:
    """Flickr-style: no filepath, images under a separate root."""
    root = tmp_path / "flickr30k_images"
    splits = ["train", "train", "train", "train", "val", "test"]
    images = []
    for k, split in enumerate(splits):
        name = f"{1000 + k}.jpg"
        _png(root / name, COLORS[k])
        images.append(_entry(name, split, [f"photo {k} a", f"photo {k} b "], imgid=k))
    return _write_json(tmp_path / "ann" / "dataset_flickr30k.json", images), root


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """COCO-style: filepath subfolders next to the JSON, a restval entry counted as train."""
    layout = [
        ("train2014", "train"),
        ("train2014", "train"),
        ("val2014", "restval"),
        ("val2014", "val"),
        ("val2014", "test"),
    ]
    images = []
    for k, (folder, split) in enumerate(layout):
        name = f"COCO_{folder}_{k:012d}.jpg"
        _png(tmp_path / "coco" / folder / name, COLORS[k])
        images.append(_entry(name, split, [f"coco {k}"], filepath=folder, imgid=k, cocoid=500 + k))
    return _write_json(tmp_path / "coco" / "dataset_coco.json", images)


# ---- Karpathy ---------------------------------------------------------------------------------


def test_flickr_splits_captions_and_images(flickr):
    json_path, root = flickr
    train = KarpathyDataset(json_path, "train", image_root=root)
    assert isinstance(train, ImageCaptionDataset)
    assert len(train) == 4
    assert len(KarpathyDataset(json_path, "val", image_root=root)) == 1
    assert len(KarpathyDataset(json_path, "test", image_root=root)) == 1
    assert len(KarpathyDataset(json_path, "train+val", image_root=root)) == 5
    assert len(KarpathyDataset(json_path, "validation", image_root=root)) == 1  # alias
    assert train.captions(2) == ["photo 2 a", "photo 2 b"]  # stripped
    ex = train[1]
    assert isinstance(ex, Example)
    assert ex.image.mode == "RGB" and ex.image.size == (8, 6)
    assert ex.image.getpixel((0, 0)) == COLORS[1]
    assert ex.captions == ["photo 1 a", "photo 1 b"]
    assert ex.attributes is None
    assert ex.image_id == "1"
    assert train[-1].image_id == "3"
    with pytest.raises(IndexError):
        train[4]
    assert "dataset_flickr30k" in train.name


def test_coco_filepath_and_restval_counted_in_train(coco):
    train = KarpathyDataset(coco, "train")  # image root defaults to the JSON's directory
    assert len(train) == 3
    assert sorted(train.image_id(i) for i in range(3)) == ["500", "501", "502"]
    assert train.image(2).getpixel((0, 0)) == COLORS[2]  # the restval one, under val2014/
    assert len(KarpathyDataset(coco, ["train", "restval"])) == 3
    assert len(KarpathyDataset(coco, "train+restval")) == 3
    assert len(KarpathyDataset(coco, "restval")) == 1
    assert len(KarpathyDataset(coco, "val")) == 1
    test = KarpathyDataset(coco, "test")
    assert test.captions(0) == ["coco 4"]


def test_generated_layout_attributes_and_auto(tmp_path):
    d = tmp_path / "corpus"
    images = []
    for k in range(3):
        _png(d / "images" / f"{k:06d}.png", COLORS[k])
        attrs = {"shape": "circle", "color": ["red", "green", "blue"][k]}
        images.append(
            _entry(
                f"{k:06d}.png",
                "train",
                [f"a {attrs['color']} circle"],
                filepath="images",
                imgid=k,
                attributes=attrs,
            )
        )
    _write_json(d / "dataset.json", images)
    ds = open_dataset(d, "train")  # a directory holding dataset*.json -> Karpathy
    assert isinstance(ds, KarpathyDataset)
    assert ds.attributes(1) == {"shape": "circle", "color": "green"}
    ds.attributes(1)["color"] = "mutated"  # callers get copies
    assert ds[1].attributes == {"shape": "circle", "color": "green"}
    assert isinstance(open_dataset(d / "dataset.json", "train", fmt="karpathy"), KarpathyDataset)


def test_lazy_decoding_and_subset_views(flickr, monkeypatch):
    json_path, root = flickr
    calls = []
    real_open = PIL.Image.open

    def counting_open(*args, **kwargs):
        calls.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    ds = KarpathyDataset(json_path, "train", image_root=root)
    caps = [ds.captions(i) for i in range(len(ds))]
    sub = ds.subset([3, 1])
    assert sub.captions(0) == caps[3] and len(sub) == 2
    subsub = sub.subset([1])
    assert subsub.captions(0) == caps[1] and subsub.image_id(0) == "1"
    assert calls == []  # no image opened by construction, captions() or subset()
    assert sub[0].image.getpixel((0, 0)) == COLORS[3]
    assert len(calls) == 1
    with pytest.raises(IndexError):
        ds.subset([7])


# ---- Karpathy errors ---------------------------------------------------------------------------


def test_missing_images_counted_and_named(tmp_path):
    names = [f"img{k}.jpg" for k in range(7)]
    json_path = _write_json(
        tmp_path / "dataset_flickr30k.json", [_entry(n, "train", ["x"]) for n in names]
    )
    _png(tmp_path / "imgs" / "img0.jpg", COLORS[0])
    with pytest.raises(FileNotFoundError) as err:
        KarpathyDataset(json_path, "train", image_root=tmp_path / "imgs")
    msg = str(err.value)
    assert "6 of 7" in msg and str(tmp_path / "imgs") in msg and "image_root" in msg
    assert all(n in msg for n in names[1:6]) and "img0.jpg" not in msg
    ds = KarpathyDataset(json_path, "train", image_root=tmp_path / "imgs", check_files=False)
    assert ds.captions(3) == ["x"]
    with pytest.raises(FileNotFoundError, match=r"img3\.jpg"):
        ds.image(3)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        KarpathyDataset(json_path, "train", image_root=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("content", "exc", "pattern"),
    [
        ("{not json", ValueError, "not valid JSON"),
        (json.dumps({"annotations": []}), ValueError, "no top-level 'images' key"),
        (
            json.dumps(
                {
                    "images": [
                        _entry("a.jpg", "train", ["x"]),
                        {"filename": "b.jpg", "split": "train"},
                    ]
                }
            ),
            ValueError,
            r"images\[1\] is missing the key 'sentences'",
        ),
        (
            json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}]}),
            ValueError,
            r"images\[0\] is missing the key 'split'",
        ),
        (
            json.dumps({"images": [_entry("a.jpg", "train", [])]}),
            ValueError,
            r"images\[0\] \(a.jpg\) has no captions",
        ),
    ],
)
def test_malformed_json_errors(tmp_path, content, exc, pattern):
    path = tmp_path / "dataset_x.json"
    path.write_text(content)
    with pytest.raises(exc, match=pattern) as err:
        KarpathyDataset(path, "train", check_files=False)
    assert str(path) in str(err.value)


def test_missing_json_and_empty_split(tmp_path, coco):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KarpathyDataset(tmp_path / "nope.json", "train")
    with pytest.raises(ValueError) as err:
        KarpathyDataset(coco, "dev")
    msg = str(err.value)
    assert "'dev'" in msg and "'train' (2)" in msg and "'restval' (1)" in msg and "'test'" in msg


# ---- Hugging Face ------------------------------------------------------------------------------


def _hf_dataset(caption_column="caption", image_column="image", single=False):
    import datasets

    splits = ["train", "train", "test", "val", "train"]
    imgs = [PIL.Image.new("RGB", (5, 4), COLORS[k]) for k in range(len(splits))]
    caps = [f"hf {k}" if single else [f"hf {k} a", f"hf {k} b"] for k in range(len(splits))]
    cap_feature = datasets.Value("string") if single else datasets.List(datasets.Value("string"))
    features = datasets.Features(
        {
            image_column: datasets.Image(),
            caption_column: cap_feature,
            "split": datasets.Value("string"),
            "img_id": datasets.Value("string"),
        }
    )
    data = {
        image_column: imgs,
        caption_column: caps,
        "split": splits,
        "img_id": [f"id{k}" for k in range(len(splits))],
    }
    return datasets.Dataset.from_dict(data, features=features)


def test_hf_save_to_disk_with_split_column(tmp_path, monkeypatch):
    _hf_dataset().save_to_disk(tmp_path / "hf")
    ds = open_dataset(tmp_path / "hf", "train")  # auto: save_to_disk dir, 'split' column
    assert isinstance(ds, HFImageCaptionDataset)
    assert len(ds) == 3
    assert [ds.image_id(i) for i in range(3)] == ["id0", "id1", "id4"]
    ex = ds[2]
    assert ex.captions == ["hf 4 a", "hf 4 b"] and ex.attributes is None
    assert ex.image.mode == "RGB" and ex.image.getpixel((0, 0)) == COLORS[4]
    assert len(open_dataset(tmp_path / "hf", "validation")) == 1  # alias of 'val'
    explicit = open_dataset(tmp_path / "hf", "test", fmt="hf", split_column="split")
    assert explicit.captions(0) == ["hf 2 a", "hf 2 b"]

    calls = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    fresh = open_dataset(tmp_path / "hf", "train")
    assert [fresh.captions(i) for i in range(3)][1] == ["hf 1 a", "hf 1 b"]
    assert fresh.subset([2, 0]).captions(0) == ["hf 4 a", "hf 4 b"]
    assert calls == []  # captions never decode images
    fresh.image(0)
    assert len(calls) == 1


def test_hf_dataset_dict_matches_karpathy_examples(tmp_path):
    import datasets

    full = _hf_dataset()
    dd = datasets.DatasetDict(
        {"train": full.select([0, 1, 4]), "test": full.select([2]), "validation": full.select([3])}
    )
    dd.save_to_disk(tmp_path / "dd")
    ds = open_dataset(tmp_path / "dd", "train")
    # The same data as a Karpathy JSON + files yields equal Examples (one code path).
    images = []
    for k in (0, 1, 4):
        _png(tmp_path / "k" / f"{k}.png", COLORS[k], size=(5, 4))
        images.append(_entry(f"{k}.png", "train", [f"hf {k} a", f"hf {k} b"], image_id=f"id{k}"))
    kds = KarpathyDataset(_write_json(tmp_path / "k" / "dataset.json", images), "train")
    for a, b in zip(ds, kds, strict=True):
        assert a.captions == b.captions and a.image_id == b.image_id
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert len(open_dataset(tmp_path / "dd", "val")) == 1
    assert len(open_dataset(tmp_path / "dd", "all")) == 5
    with pytest.raises(ValueError, match=r"splits train, test, validation.*'dev'.*'train' \(3\)"):
        open_dataset(tmp_path / "dd", "dev")
    without_column = datasets.DatasetDict({k: v.remove_columns("split") for k, v in dd.items()})
    without_column.save_to_disk(tmp_path / "dd2")
    with pytest.raises(ValueError, match=r"no split 'dev'; splits that exist: 'test' \(1\)"):
        open_dataset(tmp_path / "dd2", "dev")


def test_hf_single_string_captions_custom_columns(tmp_path):
    _hf_dataset(caption_column="text", image_column="img", single=True).save_to_disk(
        tmp_path / "hf"
    )
    ds = open_dataset(tmp_path / "hf", "test", image_column="img", caption_column="text")
    assert ds.captions(0) == ["hf 2"]
    assert ds[0].image.getpixel((0, 0)) == COLORS[2]
    with pytest.raises(ValueError) as err:
        open_dataset(tmp_path / "hf", "test")  # default columns do not exist
    msg = str(err.value)
    assert "'image'" in msg and "img, text, split, img_id" in msg and "image_column" in msg


def test_hf_parquet_and_image_dicts(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    full = _hf_dataset()
    full.select([0, 1, 4]).to_parquet(str(tmp_path / "pq" / "data" / "train-00000.parquet"))
    full.select([2]).to_parquet(str(tmp_path / "pq" / "data" / "test-00000.parquet"))
    ds = open_dataset(tmp_path / "pq", "test")  # auto: parquet files, splits by file name
    assert ds.captions(0) == ["hf 2 a", "hf 2 b"]
    assert ds.image(0).getpixel((0, 0)) == COLORS[2]
    assert len(open_dataset(tmp_path / "pq", "train")) == 3

    # An image column of plain {"bytes", "path"} structs (no Image feature) decodes too.
    buf = io.BytesIO()
    PIL.Image.new("L", (3, 3), 77).save(buf, format="PNG")
    raw = datasets.Dataset.from_dict(
        {"image": [{"bytes": buf.getvalue(), "path": None}], "caption": ["grey"]}
    )
    raw.save_to_disk(tmp_path / "raw")
    one = open_dataset(tmp_path / "raw", "all")
    assert one.image(0).mode == "RGB" and one.image(0).getpixel((1, 1)) == (77, 77, 77)
    assert one.captions(0) == ["grey"]
    with pytest.raises(ValueError, match="split_column"):
        open_dataset(tmp_path / "raw", "train")


def test_hf_and_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local dataset path"):
        open_dataset("AnyModal/flickr30k", "test")
    with pytest.raises(FileNotFoundError, match="not a local dataset path"):
        HFImageCaptionDataset(tmp_path / "missing", "train")
    _hf_dataset().save_to_disk(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"no split column 'part'.*columns that exist"):
        open_dataset(tmp_path / "hf", "train", split_column="part")
    with pytest.raises(ValueError, match=r"no items in split 'dev'.*'train' \(3\)"):
        open_dataset(tmp_path / "hf", "dev")
    with pytest.raises(ValueError, match="dataset-format must be one of"):
        open_dataset(tmp_path / "hf", "train", fmt="csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_dataset(tmp_path / "empty", "train")
