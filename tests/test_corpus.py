"""The synthetic corpus: determinism, Karpathy layout, caption/attribute agreement, a task that
needs the whole caption, a real pretrain->target shift, pixels that carry the attributes, and
crash-safe caching."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcsr_flower.embedded import corpus
from rcsr_flower.embedded.corpus import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    OBJECT_RGB,
    SYNONYMS,
    CorpusSpec,
    caption_mentions,
    generate_corpus,
    parse_caption,
)
from rcsr_flower.embedded.render import render_image

SMALL = CorpusSpec(n_train=40, n_val=5, n_test=10)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("small") / "corpus", SMALL, workers=1)


def _records(spec: CorpusSpec, n: int | None = None) -> list[dict]:
    """Corpus records without rendering pixels (identical to what generate_corpus stores)."""
    return [corpus._make_item(spec, i, None) for i in range(n or spec.n_total)]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- determinism -----------------------------------------------------------------------------


def test_same_spec_gives_identical_bytes_for_any_worker_count(small_corpus: Path, tmp_path: Path):
    again = generate_corpus(tmp_path / "again", SMALL, workers=2)  # forked pool, 7 chunks
    assert _tree(again.parent) == _tree(small_corpus.parent)
    stored = json.loads(small_corpus.read_text())["images"]
    assert stored == json.loads(json.dumps(_records(SMALL)))


def test_different_seed_or_domain_gives_different_corpus(small_corpus: Path, tmp_path: Path):
    other = generate_corpus(tmp_path / "other", CorpusSpec(n_train=40, n_val=5, n_test=10, seed=1))
    a, b = _tree(small_corpus.parent), _tree(other.parent)
    assert a["dataset.json"] != b["dataset.json"]
    assert sum(a[k] != b[k] for k in a if k.startswith("images")) >= 50
    pretrain = _records(CorpusSpec(domain="pretrain", n_train=40, n_val=5, n_test=10), 20)
    assert [r["attributes"] for r in pretrain] != [r["attributes"] for r in _records(SMALL, 20)]


# --- layout ----------------------------------------------------------------------------------


def test_karpathy_layout(small_corpus: Path):
    data = json.loads(small_corpus.read_text())
    assert data["dataset"] == "rcsr-synthetic-target"
    assert data["spec"] == {
        "domain": "target",
        "n_train": 40,
        "n_val": 5,
        "n_test": 10,
        "image_size": 64,
        "captions_per_image": 5,
        "seed": 0,
    }
    images = data["images"]
    assert [im["split"] for im in images] == ["train"] * 40 + ["val"] * 5 + ["test"] * 10
    assert [im["imgid"] for im in images] == list(range(55))
    sentids = [s["sentid"] for im in images for s in im["sentences"]]
    assert len(sentids) == len(set(sentids)) == 55 * 5
    for im in images:
        assert set(im) >= {"filename", "filepath", "imgid", "split", "sentids", "sentences"}
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert len(im["sentences"]) == 5
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert s["tokens"] == corpus.tokenize(s["raw"]) and s["tokens"]
            assert all(t.isascii() and t.isalpha() and t.islower() for t in s["tokens"])
            assert set(s["raw"]) <= set("abcdefghijklmnopqrstuvwxyz ,;:-")
        assert {k: type(v) for k, v in im["attributes"].items()} == {
            k: type(v[0]) for k, v in ATTRIBUTES.items()
        }
        with Image.open(small_corpus.parent / im["filepath"] / im["filename"]) as img:
            assert img.mode == "RGB" and img.size == (64, 64)


def test_spec_validation():
    with pytest.raises(ValueError):
        CorpusSpec(domain="pretrain", captions_per_image=7)  # only 6 pretrain templates
    with pytest.raises(ValueError):
        CorpusSpec(domain="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CorpusSpec(n_train=0, n_val=0, n_test=0)


# --- captions --------------------------------------------------------------------------------


def test_every_synonym_reads_back_as_exactly_its_value():
    for attr, values in SYNONYMS.items():
        for value, phrases in values.items():
            for phrase in phrases:
                found = parse_caption(phrase)
                assert found[attr] == {value}, phrase
                assert all(not v for a, v in found.items() if a != attr), phrase


@pytest.mark.parametrize("domain", ["target", "pretrain"])
def test_captions_express_every_attribute_and_nothing_else(domain: str):
    records = _records(CorpusSpec(domain=domain, n_train=1500, n_val=0, n_test=0))
    for rec in records:
        raws = [s["raw"] for s in rec["sentences"]]
        assert len(set(raws)) == len(raws)
        for raw in raws:
            assert all(caption_mentions(raw, rec["attributes"]).values()), raw
            found = parse_caption(raw)
            assert {a: {v} for a, v in rec["attributes"].items()} == found, raw


def test_caption_mentions_rejects_other_values():
    caption = "two small red stars in the top center on a striped navy blue background"
    attrs = {"shape": "star", "color": "red", "size": "small", "position": "top center"}
    attrs |= {"count": 2, "background": "navy", "texture": "striped"}
    assert all(caption_mentions(caption, attrs).values())
    wrong = {"color": "blue", "position": "center", "count": 1, "shape": "square"}
    assert not any(caption_mentions(caption, wrong).values())


# --- non-triviality --------------------------------------------------------------------------


def test_retrieval_needs_the_whole_caption():
    records = _records(CorpusSpec(n_train=400, n_val=0, n_test=0))
    combos = [tuple(r["attributes"].values()) for r in records]
    diffs = Counter(
        sum(x != y for x, y in zip(a, b, strict=True)) for a, b in itertools.combinations(combos, 2)
    )
    assert diffs[1] >= 10  # pairs that differ in exactly one attribute
    assert diffs[2] >= 100
    assert len(set(combos)) >= 0.97 * len(combos)


# --- domain shift ----------------------------------------------------------------------------


def test_pretrain_and_target_differ_in_marginals_and_phrasing():
    target = _records(CorpusSpec(n_train=1200, n_val=0, n_test=0))
    pretrain = _records(CorpusSpec(domain="pretrain", n_train=1200, n_val=0, n_test=0, seed=1))

    def ratio(records: list[dict], attr: str) -> float:
        counts = Counter(r["attributes"][attr] for r in records)
        assert set(counts) == set(ATTRIBUTES[attr])  # every value occurs in both domains
        return max(counts.values()) / min(counts.values())

    for attr in ATTRIBUTES:
        ratio(target, attr), ratio(pretrain, attr)
    assert ratio(pretrain, "color") > 4 > 2 > ratio(target, "color")
    assert ratio(pretrain, "shape") > 4 > 2 > ratio(target, "shape")
    assert ratio(pretrain, "texture") > 4

    def vocab(records: list[dict]) -> set[str]:
        return {t for r in records for s in r["sentences"] for t in s["tokens"]}

    assert vocab(pretrain) < vocab(target)
    assert {"crimson", "hoop", "backdrop", "chequered", "corner"} <= vocab(target) - vocab(pretrain)


# --- pixels ----------------------------------------------------------------------------------


def _render(domain: str, seed: int = 0, **attrs) -> np.ndarray:
    base = {"shape": "circle", "color": "yellow", "size": "medium", "position": "center"}
    base |= {"count": 1, "background": "black", "texture": "plain"}
    return render_image(base | attrs, np.random.default_rng(seed), 64, domain).astype(float)


def _object_mask(img: np.ndarray, background: str = "black") -> np.ndarray:
    return np.abs(img - BACKGROUND_RGB[background]).max(axis=-1) > 60


def _components(mask: np.ndarray) -> int:
    """Number of 8-connected blobs (anti-aliased star tips touch only diagonally)."""
    seen, n = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        n, stack = n + 1, [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for q in itertools.product((y - 1, y, y + 1), (x - 1, x, x + 1)):
                if 0 <= q[0] < 64 and 0 <= q[1] < 64 and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
    return n


@pytest.mark.parametrize("domain", ["target", "pretrain"])
def test_pixels_carry_colour_size_count_and_position(domain: str):
    palette = np.array(list(OBJECT_RGB.values()), float)
    for i, colour in enumerate(OBJECT_RGB):
        img = _render(domain, i, color=colour, size="large", background="gray")
        inner = np.abs(img - BACKGROUND_RGB["gray"]).max(axis=-1) > 60
        mean = img[inner].mean(axis=0)
        assert np.argmin(((palette - mean) ** 2).sum(axis=1)) == i, colour
    for shape in ATTRIBUTES["shape"]:
        area = {
            s: _object_mask(_render(domain, 1, shape=shape, size=s)).sum()
            for s in ("small", "medium", "large")
        }
        assert area["small"] < 0.7 * area["medium"] < 0.7**2 * area["large"], (shape, area)
        for count, size, seed in itertools.product((1, 2, 3), ATTRIBUTES["size"], range(2)):
            mask = _object_mask(_render(domain, seed, shape=shape, size=size, count=count))
            assert _components(mask) == count, (shape, size, count)
    for k, position in enumerate(ATTRIBUTES["position"]):
        ys, xs = np.nonzero(_object_mask(_render(domain, k, position=position, size="small")))
        assert (int(ys.mean() // (64 / 3)), int(xs.mean() // (64 / 3))) == divmod(k, 3)


def test_pixels_carry_texture_and_domain_rendering():
    plain = _render("pretrain", texture="plain", size="small", position="top left")
    for texture in ("striped", "dotted", "checkered"):
        img = _render("pretrain", texture=texture, size="small", position="top left")
        assert img[32:, 32:].std(axis=(0, 1)).min() > 8 > 1 > plain[32:, 32:].std(axis=(0, 1)).max()
    # target adds pixel noise; pretrain backgrounds are flat
    noise = {d: _render(d)[:10, :10].std(axis=(0, 1)).min() for d in ("target", "pretrain")}
    assert noise["target"] > 3 > 0.5 > noise["pretrain"]


# --- caching and crash safety ----------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("interrupted")


def test_reuses_a_complete_corpus_of_the_same_spec(small_corpus: Path, monkeypatch):
    before = _tree(small_corpus.parent)
    monkeypatch.setattr(corpus, "render_image", _boom)
    assert generate_corpus(small_corpus.parent, SMALL, workers=1) == small_corpus
    assert _tree(small_corpus.parent) == before


def test_interrupted_run_leaves_nothing_at_out_dir(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpus, "render_image", _boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_corpus(tmp_path / "c", SMALL, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_replaces_partial_or_other_spec_corpus_but_not_foreign_data(tmp_path: Path):
    out = tmp_path / "c"
    (out / "images").mkdir(parents=True)
    (out / "images" / "000000.png").write_bytes(b"half")  # killed non-atomic writer
    dead = tmp_path / f".c.partial-{corpus.socket.gethostname()}-99999999-abcd"
    (dead / "images").mkdir(parents=True)  # temp dir of a killed run
    tiny = CorpusSpec(n_train=6, n_val=1, n_test=1)
    path = generate_corpus(out, tiny, workers=1)
    assert json.loads(path.read_text())["spec"]["n_train"] == 6
    assert not dead.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c"]

    other = CorpusSpec(n_train=7, n_val=1, n_test=1)
    generate_corpus(out, other, workers=1)
    assert len(list((out / "images").iterdir())) == 9
    (out / "images" / "000003.png").unlink()  # damaged corpus is rebuilt
    generate_corpus(out, other, workers=1)
    assert (out / "images" / "000003.png").is_file()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        generate_corpus(foreign, tiny, workers=1)
    assert (foreign / "notes.txt").read_text() == "keep"


# --- a larger corpus for many clients --------------------------------------------------------


def test_extended_corpus_keeps_the_default_items_and_appends_training_items(tmp_path: Path):
    """``embedded-train-items`` > 6000: the default corpus's items at the same indices,
    byte for byte (its first training items, val and test split), and the extra training
    items after its test split, read back by the Karpathy reader as training items after
    the first ones; the default spec and the shipped backbone's recipe are untouched."""
    from dataclasses import asdict

    from rcsr_flower.data.datasets import open_dataset
    from rcsr_flower.embedded.corpus import ExtendedCorpusSpec, target_spec
    from rcsr_flower.embedded.tiny_clip import TinyClipRecipe

    assert target_spec(6000) == CorpusSpec() and "extra_train" not in asdict(CorpusSpec())
    assert "extra_train" not in json.dumps(asdict(TinyClipRecipe()))
    big = target_spec(6400)
    assert isinstance(big, ExtendedCorpusSpec) and big.n_total == 7900
    base = CorpusSpec()
    for i in (0, 5999, 6000, 6499, 6500, 7499):  # train, val and test of the default corpus
        assert corpus._make_item(big, i, None) == corpus._make_item(base, i, None)
    assert [big.split_of(i) for i in (7499, 7500, 7899)] == ["test", "train", "train"]
    with pytest.raises(ValueError, match="at least 6000 training items"):
        target_spec(5999)

    small = SMALL
    extended = ExtendedCorpusSpec(n_train=40, n_val=5, n_test=10, extra_train=6)
    path = generate_corpus(tmp_path / "big", extended, workers=1)
    train = open_dataset(path, "train")
    plain = open_dataset(generate_corpus(tmp_path / "small", small, workers=1), "train")
    assert len(train) == 46 and [train.captions(i) for i in range(40)] == [
        plain.captions(i) for i in range(40)
    ]
    assert len(open_dataset(path, "test")) == 10
    assert json.loads(path.read_text())["spec"]["extra_train"] == 6
