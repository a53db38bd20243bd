"""The embedded backbone is a real Hugging Face CLIP directory, loaded like any checkpoint;
so are a ViT-B/32-shaped random CLIP and a hub id found in the local Hugging Face cache."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from rcsr_flower.backbones.clip import BackboneNotFoundError, load_backbone
from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.retrieval.evaluation import evaluate_retrieval, preprocess_split


def test_embedded_backbone_is_a_standard_hf_model_directory(embedded_assets):
    d = embedded_assets.backbone_dir
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ):
        assert (d / name).is_file(), name
    model = CLIPModel.from_pretrained(d)
    tokenizer = AutoTokenizer.from_pretrained(d)
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    report = embedded_assets.pretrain_report()
    assert report["recipe"]["seed"] == 0 and report["pretrain_test"]["rsum"] > 0


def test_load_backbone_is_frozen_and_cached_per_process(embedded_assets, backbone):
    again = load_backbone(str(embedded_assets.backbone_dir), device="cpu")
    assert again is backbone
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_a_checkpoint_asked_for_under_another_name_keeps_that_name(embedded_assets, backbone):
    """The name keys cached partitions: one process that loaded the checkpoint as
    "embedded" and then by its path (a test worker running both kinds of test) computed
    the partition under one key and looked for it under the other."""
    path = str(embedded_assets.backbone_dir)
    named = load_backbone(path, device="cpu", name="embedded")
    assert named.name == "embedded" and backbone.name == path
    assert load_backbone(path, device="cpu", name="embedded") is named


def test_zero_shot_is_clearly_above_chance(embedded_assets, backbone):
    test = open_dataset(embedded_assets.corpus_json, "test").subset(range(200))
    metrics = evaluate_retrieval(backbone, preprocess_split(backbone, test), None)
    chance = 2 * sum(100 * k / 200 for k in (1, 5, 10))  # 16 for 200 images
    assert metrics["rsum"] > 3 * chance, metrics


def test_dynamic_padding_gives_the_same_embeddings_as_fixed_padding(backbone):
    captions = ["a red star", "two small blue circles in the top left on a striped background"]
    dynamic = backbone.tokenize(captions)
    assert dynamic["input_ids"].shape[1] < backbone.max_text_length
    fixed = backbone.tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=backbone.max_text_length,
        return_tensors="pt",
    )
    fixed = {"input_ids": fixed["input_ids"], "attention_mask": fixed["attention_mask"]}
    with torch.no_grad():
        a, b = backbone.text_features(dynamic), backbone.text_features(fixed)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("which", ["backbone", "vit_b32"])
def test_cached_token_ids_give_the_tokenizers_own_tensors(which, request, embedded_assets):
    """Captions are tokenised once per process and padded from the cache: bit-identical
    to the tokenizer's padding="longest", truncation included, on a second call too."""
    from rcsr_flower.backbones import clip

    model = request.getfixturevalue(which)
    test = open_dataset(embedded_assets.corpus_json, "test").subset(range(12))
    captions = [c for i in range(len(test)) for c in test.captions(i)]
    too_long = " ".join(["a red star beside two small blue circles"] * 20)
    batches = [captions[:7], [captions[3], too_long, "a star", captions[3]], captions]
    model._token_ids.clear()
    for batch in (*batches, *batches):  # the second round reads the cache only
        ours = model.tokenize(batch)
        theirs = model.tokenizer(
            batch,
            padding="longest",
            truncation=True,
            max_length=model.max_text_length,
            return_tensors="pt",
        )
        for key in ("input_ids", "attention_mask"):
            assert ours[key].dtype == theirs[key].dtype
            assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"].shape[1] < model.max_text_length  # still padded to the longest
    assert len(model._token_ids) == len(set(captions) | {too_long, "a star"})
    saved, clip.TOKEN_CACHE_SIZE = clip.TOKEN_CACHE_SIZE, len(model._token_ids)
    try:  # bounded: a full cache starts over
        ours = model.tokenize(["a new caption"])
        theirs = model.tokenizer(["a new caption"], return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert list(model._token_ids) == ["a new caption"]
    finally:
        clip.TOKEN_CACHE_SIZE = saved


def test_length_sorted_batches_give_the_same_embeddings_in_input_order(backbone, embedded_assets):
    """Evaluation batches captions by length; the result is in the input order and equal,
    up to float rounding, to input-order batches."""
    test = open_dataset(embedded_assets.corpus_json, "test").subset(range(40))
    captions = [c for i in range(len(test)) for c in test.captions(i)]
    captions[7] = "a star"  # a very short one among long ones
    lengths = backbone.tokenize(captions)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3  # the batches really are reordered
    plain = backbone.embed_texts(captions, batch_size=16)
    sorted_ = backbone.embed_texts(captions, batch_size=16, by_length=True)
    assert sorted_.shape == plain.shape
    torch.testing.assert_close(sorted_, plain, atol=1e-5, rtol=0)
    short = backbone.embed_texts(["a star"])
    torch.testing.assert_close(sorted_[7:8], short, atol=1e-5, rtol=0)


def test_unreachable_hub_id_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone("openai/clip-vit-base-patch32-not-cached", device="cpu")
    message = str(info.value)
    assert "could not fetch" in message and "\n" not in message
    # names the model, how to get it, and where to point model-name
    assert "hf download openai/clip-vit-base-patch32-not-cached --local-dir DIR" in message
    assert "set model-name to that DIR" in message


def test_dynamic_padding_matches_padding_to_77_on_vit_b32(vit_b32):
    from rcsr_flower.embedded.random_clip import random_captions

    captions = [*random_captions(4, seed=1), "a dog"]
    dynamic = vit_b32.tokenize(captions)
    assert dynamic["input_ids"].shape[1] < 20
    fixed = vit_b32.tokenizer(
        captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    )
    assert fixed["input_ids"].shape[1] == 77 == vit_b32.max_text_length
    fixed = {"input_ids": fixed["input_ids"], "attention_mask": fixed["attention_mask"]}
    with torch.no_grad():
        a, b = vit_b32.text_features(dynamic), vit_b32.text_features(fixed)
    assert torch.allclose(a, b, atol=1e-5)


def test_hub_id_loads_offline_from_the_local_hugging_face_cache(tmp_path):
    """``model-name = "org/name"`` after ``hf download org/name`` (no --local-dir): the id
    resolves in the HF cache with the hub unreachable. A fresh interpreter, because the hub
    client reads its cache location at import."""
    from rcsr_flower.embedded.random_clip import save_random_clip, tiny_clip_config

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example-org--clip-tiny"
    save_random_clip(repo / "snapshots" / commit, tiny_clip_config())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from rcsr_flower.backbones.clip import load_backbone\n"
        "b = load_backbone('example-org/clip-tiny', device='cpu')\n"
        "print(b.name, b.dim, type(b.tokenizer).__name__, b.model.config.vision_config.image_size)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["example-org/clip-tiny", "64", "CLIPTokenizer", "64"]
    shutil.rmtree(tmp_path / "hub")


def test_pretraining_is_reproducible_and_saves_a_loadable_checkpoint(tmp_path):
    """The embedded backbone's recipe, shrunk: same code path, seconds instead of minutes."""
    from safetensors.torch import load_file

    from rcsr_flower.embedded.corpus import CorpusSpec, generate_corpus
    from rcsr_flower.embedded.pretrain import pretrain_tiny_clip
    from rcsr_flower.embedded.tiny_clip import TinyClipRecipe

    spec = CorpusSpec(domain="pretrain", n_train=48, n_val=0, n_test=16, seed=1)
    corpus = generate_corpus(tmp_path / "corpus", spec, workers=1)
    recipe = TinyClipRecipe(
        corpus=spec,
        steps=3,
        batch_size=16,
        warmup_steps=1,
        width=32,
        layers=1,
        heads=2,
        projection_dim=16,
        vocab_size=120,
    )
    report = pretrain_tiny_clip(tmp_path / "a", corpus, recipe)
    pretrain_tiny_clip(tmp_path / "b", corpus, recipe)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report["steps"] == 3 and "rsum" in report["pretrain_test"]
    loaded = load_backbone(str(tmp_path / "a"), device="cpu")
    assert loaded.dim == 16 and loaded.model.config.vision_config.num_hidden_layers == 1


def test_shipped_backbone_has_its_checksum_and_todays_recipe():
    """The repository's pretrained backbone is the one `assets pretrain` wrote from
    `TinyClipRecipe()`; a changed recipe without a rebuilt backbone fails here."""
    from rcsr_flower.embedded.assets import (
        SHIPPED_BACKBONE,
        SHIPPED_SHA256,
        sha256_file,
        shipped_backbone_problem,
    )
    from rcsr_flower.embedded.tiny_clip import TinyClipRecipe

    assert sha256_file(SHIPPED_BACKBONE / "model.safetensors") == SHIPPED_SHA256
    assert shipped_backbone_problem(SHIPPED_BACKBONE, TinyClipRecipe()) is None
    size = sum(p.stat().st_size for p in SHIPPED_BACKBONE.iterdir())
    assert size < 10 * 2**20, size


def test_a_corrupted_shipped_backbone_is_an_error_not_a_silent_pretraining(
    tmp_path, monkeypatch, capsys
):
    """A partial or corrupted checkout must not start an hour of pretraining inside a run:
    the build stops at once, naming the file, the checksum it expects and the two fixes."""
    import shutil

    from rcsr_flower.embedded import assets

    shipped = tmp_path / "tiny-clip"
    shutil.copytree(assets.SHIPPED_BACKBONE, shipped)
    weights = shipped / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated file
    monkeypatch.setattr(assets, "SHIPPED_BACKBONE", shipped)
    cache = tmp_path / "cache"
    assert assets.main(["build", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and assets.SHIPPED_SHA256 in err
    assert "git checkout -- embedded/tiny-clip" in err and "build --pretrain" in err
    assert not any(cache.rglob("dataset.json"))  # nothing was built before the check
    with pytest.raises(assets.ShippedBackboneError, match="SHA-256"):
        assets.ensure_assets(cache, in_process=True)


def test_the_cache_holds_the_shipped_backbone(embedded_assets):
    from rcsr_flower.embedded.assets import SHIPPED_SHA256, sha256_file

    assert sha256_file(embedded_assets.backbone_dir / "model.safetensors") == SHIPPED_SHA256


def test_shipped_backbone_stays_out_of_the_flower_app_bundle():
    """`flwr run .` packs files by flwr's include patterns (*.py, *.json, ...): of the shipped
    backbone only its small JSON files may travel, never the weights."""
    from pathlib import Path

    from flwr.cli.utils import build_pathspec
    from flwr.common.constant import FAB_INCLUDE_PATTERNS

    from rcsr_flower.embedded.assets import SHIPPED_BACKBONE

    root = Path(__file__).resolve().parents[1]
    shipped = [p.relative_to(root).as_posix() for p in SHIPPED_BACKBONE.rglob("*")]
    picked = list(build_pathspec(FAB_INCLUDE_PATTERNS).match_files(shipped))
    assert "embedded/tiny-clip/model.safetensors" in shipped
    assert not any(p.endswith(".safetensors") for p in picked)
    assert sum((root / p).stat().st_size for p in picked) < 256 * 1024, picked


def test_no_target_caption_outgrows_the_text_context(embedded_assets, backbone):
    for split in ("train", "val", "test"):
        data = open_dataset(embedded_assets.corpus_json, split)
        captions = [c for i in range(len(data)) for c in data.captions(i)]
        lengths = [len(ids) for ids in backbone.tokenizer(captions)["input_ids"]]
        assert max(lengths) <= backbone.max_text_length, (split, max(lengths))


def test_info_json_reports_the_benchmark(embedded_assets, capsys):
    import json

    from rcsr_flower.embedded.assets import main

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["truncated_train_captions"] == info["truncated_test_captions"] == 0
    assert info["in_domain_rsum"] == embedded_assets.pretrain_report()["pretrain_test"]["rsum"]
    assert 0 < info["zero_shot_rsum"] < info["in_domain_rsum"]
    assert info["logit_scale"] > 0
