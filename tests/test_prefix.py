"""The frozen-prefix feature cache (§2): training from cached hidden states gives
what the full towers give, on the real embedded backbone and corpus."""

import copy

import pytest
import torch

from rcsr_flower.backbones.prefix import image_prefix, text_prefix
from rcsr_flower.client.data import ClientData, client_prefix, prefix_blocks
from rcsr_flower.client.training import (
    TrainSettings,
    local_embeddings,
    local_train,
    train_image_features,
    train_text_features,
)
from rcsr_flower.config import RunConfig
from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.retrieval.evaluation import preprocess_split
from rcsr_flower.retrieval.zero_shot import backbone_digest


@pytest.fixture(scope="module")
def split(embedded_assets, backbone):
    return preprocess_split(
        backbone, open_dataset(embedded_assets.corpus_json, "train").subset(range(24))
    )


def noisy_adapters(backbone, layers: str, seed: int):
    """Adapters on the last blocks with non-zero weights, so they change every output."""
    adapters = backbone.new_adapters(layers)
    g = torch.Generator().manual_seed(seed)
    for p in adapters.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    return adapters


def test_cached_prefix_embeddings_equal_the_full_towers(backbone, split):
    adapters = noisy_adapters(backbone, "2", seed=0)
    personal = noisy_adapters(backbone, "2", seed=1)
    block = adapters.first_block("vision")
    assert block == backbone.model.config.vision_config.num_hidden_layers - 2
    idx = torch.tensor([3, 0, 7, 5])
    images = image_prefix(backbone, split.pixels, block, batch_size=10)
    assert images.hidden.shape[0] == len(split)
    with torch.no_grad():
        full = backbone.image_features(split.pixels[idx], adapters, personal)
        cached = backbone.image_features(images.images(idx), adapters, personal, prefix_block=block)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)
    tblock = adapters.first_block("text")
    texts = text_prefix(backbone, split.captions, tblock, batch_size=7)
    picks = [(3, 4), (0, 0), (7, 2), (5, 1)]  # (item, caption): rows of different lengths
    rows = [int(texts.row[i]) + j for i, j in picks]
    hidden, tokens = texts.captions(rows, backbone.tokenizer.pad_token_id)
    expected = backbone.tokenize([split.captions[i][j] for i, j in picks])
    assert torch.equal(tokens["input_ids"], expected["input_ids"])
    assert torch.equal(tokens["attention_mask"], expected["attention_mask"])
    with torch.no_grad():
        full = backbone.text_features(expected, adapters)
        cached = backbone.text_features(tokens, adapters, prefix=(tblock, hidden))
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)
    # the swapped modules are back: a plain forward afterwards is the plain forward
    with torch.no_grad():
        again = backbone.image_features(split.pixels[idx], adapters, personal)
    assert torch.equal(again, backbone.image_features(split.pixels[idx], adapters, personal))


def test_a_training_step_from_the_cache_equals_the_uncached_one(backbone, split, tmp_path):
    cfg = RunConfig(adapter_layers="2")
    plain = ClientData(0, "paired", split, split)
    cached = ClientData(0, "paired", split, split)
    cached.prefix = client_prefix(cfg, backbone, cached, tmp_path / "client.safetensors")
    assert set(cached.prefix) == {"vision", "text"}
    weights = backbone_digest(backbone)[:12]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        f"client.prefix-text-{cached.prefix['text'].block}-{weights}.safetensors",
        f"client.prefix-vision-{cached.prefix['vision'].block}-{weights}.safetensors",
    ]
    # a new process finds them on the node's disk
    again = client_prefix(cfg, backbone, plain, tmp_path / "client.safetensors")
    assert torch.equal(again["text"].hidden, cached.prefix["text"].hidden)
    # new weights under the same model-name replay nothing of the old ones
    retrained = copy.deepcopy(backbone)
    with torch.no_grad():
        retrained.model.text_model.embeddings.token_embedding.weight.mul_(1.5)
    fresh = client_prefix(cfg, retrained, plain, tmp_path / "client.safetensors")
    assert not torch.equal(fresh["text"].hidden, cached.prefix["text"].hidden)
    assert len(list(tmp_path.iterdir())) == 4

    settings = TrainSettings(lr=1e-2, epochs=1, batch_size=8, anchoring=False)
    trained, start = {}, backbone.new_adapters("2").state_dict()
    for name, data in (("plain", plain), ("cached", cached)):
        shared = backbone.new_adapters("2")
        shared.load_state_dict(start)
        out = local_train(backbone, shared, None, data, None, settings, seed=5)
        assert out["steps"] == 3
        trained[name] = shared.state_dict()
    for key, value in trained["plain"].items():
        torch.testing.assert_close(trained["cached"][key], value, rtol=1e-5, atol=1e-6)
    moved = [k for k, v in trained["plain"].items() if ".up." in k and v.abs().sum() > 0]
    assert moved  # the step really changed the adapters
    # the reply statistics come from the cache too, and agree
    shared = backbone.new_adapters("2")
    shared.load_state_dict(trained["plain"])
    for a, b in zip(
        local_embeddings(backbone, plain, [shared], 16, seed=1),
        local_embeddings(backbone, cached, [shared], 16, seed=1),
        strict=True,
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_a_cache_for_other_adapters_is_not_used(backbone, split):
    data = ClientData(0, "paired", split, split)
    data.prefix = {"vision": image_prefix(backbone, split.pixels, 0)}  # ends at block 0
    adapters = noisy_adapters(backbone, "2", seed=2)  # starts later: the cache does not fit
    idx = torch.arange(4)
    with torch.no_grad():
        z = train_image_features(backbone, data, idx, [adapters])
        full = backbone.image_features(split.pixels[idx], adapters)
    assert torch.equal(z, full)
    with torch.no_grad():  # and captions without a cache take the plain path
        z_t = train_text_features(backbone, data, [(0, 0), (1, 1)], [adapters])
    assert z_t.shape == (2, backbone.dim)


def test_nothing_is_cached_for_adapters_on_every_block(backbone):
    assert prefix_blocks(RunConfig(adapter_layers="all"), backbone) == {}
    n = backbone.model.config.vision_config.num_hidden_layers
    assert prefix_blocks(RunConfig(adapter_layers="1"), backbone)["vision"] == n - 1


def test_the_prefix_cache_benchmark_prints_its_json_line():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "benchmarks/prefix_cache.py", "--tiny", "--items", "8", "--repeats", "1"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["uncached_s"] > 0 and line["cached_s"] > 0 and line["fill_s"] > 0
    assert line["eval_uncached_s"] > 0 and line["eval_cached_s"] > 0 and line["eval_fill_s"] > 0
    assert line["eval_same"] is True  # the cached evaluation's metrics, exactly
    # the ratio of the unrounded times: within what rounding each to 1 ms allows
    u, c = line["uncached_s"], line["cached_s"]
    assert (u - 5e-4) / (c + 5e-4) - 0.01 <= line["ratio"] <= (u + 5e-4) / (c - 5e-4) + 0.01


def count_block_calls(backbone, tower: str, block: int) -> list[int]:
    """How often ``block`` of ``tower`` runs (a forward hook that only counts)."""
    calls = [0]
    layers = getattr(backbone.model, f"{tower}_model").encoder.layers

    def hook(*_):
        calls[0] += 1

    handle = layers[block].register_forward_hook(hook)
    return calls, handle


@pytest.mark.parametrize("layers", ["all", "2"])
def test_evaluation_replays_the_split_prefix_bit_for_bit(backbone, split, layers):
    """The evaluation's cache runs the plain path's very batches: the same embeddings to
    the last bit (so a run's metrics do not move), and the frozen blocks run once."""
    from rcsr_flower.retrieval.evaluation import SplitTensors, embed_split, evaluate_retrieval

    shared = noisy_adapters(backbone, layers, seed=3)
    personal = noisy_adapters(backbone, layers, seed=4)
    # batches of 10 images and 7 captions: several of each, sorted by length, ragged ends
    plain = embed_split(backbone, split, shared, personal, batch_size=7)
    cached_split = SplitTensors(split.pixels, split.captions)
    first = embed_split(backbone, cached_split, shared, personal, batch_size=7, prefix_bytes=1e9)
    kept = cached_split.eval_prefix
    assert kept is not None and kept.nbytes > 0
    assert kept.key == (shared.first_block("vision"), shared.first_block("text"), 7)
    frozen = shared.first_block("vision")  # the last frozen block's output is what is kept
    calls, handle = count_block_calls(backbone, "vision", frozen)
    try:
        later = embed_split(
            backbone, cached_split, shared, personal, batch_size=7, prefix_bytes=1e9
        )
    finally:
        handle.remove()
    assert calls == [0]  # replayed, not recomputed
    for a, b, c in zip(plain, first, later, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert cached_split.eval_prefix is kept
    assert evaluate_retrieval(
        backbone, cached_split, shared, personal, batch_size=7, prefix_bytes=1e9
    ) == evaluate_retrieval(backbone, split, shared, personal, batch_size=7)


def test_the_evaluation_prefix_respects_its_budget_and_its_adapters(backbone, split):
    from rcsr_flower.retrieval.evaluation import SplitTensors, embed_split

    adapters = noisy_adapters(backbone, "2", seed=5)
    plain = embed_split(backbone, split, adapters, batch_size=8)
    small = SplitTensors(split.pixels, split.captions)
    # 0 (backbone pretraining, prefix-cache = false): nothing kept
    out = embed_split(backbone, small, adapters, batch_size=8, prefix_bytes=0.0)
    assert small.eval_prefix is None
    assert all(torch.equal(a, b) for a, b in zip(plain, out, strict=True))
    # a budget too small: refused once (kept empty, not recomputed), evaluated in full
    refused = []
    for _ in range(2):
        out = embed_split(backbone, small, adapters, batch_size=8, prefix_bytes=1e3)
        refused.append(small.eval_prefix)
        assert small.eval_prefix.images is None and small.eval_prefix.texts is None
        assert small.eval_prefix.nbytes == 0
        assert all(torch.equal(a, b) for a, b in zip(plain, out, strict=True))
    assert refused[0] is refused[1]
    small.eval_prefix = None
    embed_split(backbone, small, adapters, batch_size=8, prefix_bytes=1e9)
    kept = small.eval_prefix
    # adapters starting elsewhere, or another batch size: computed again for them
    everywhere = noisy_adapters(backbone, "all", seed=6)
    out = embed_split(backbone, small, everywhere, batch_size=8, prefix_bytes=1e9)
    assert small.eval_prefix is not kept and small.eval_prefix.key == (0, 0, 8)
    expected = embed_split(backbone, split, everywhere, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(expected, out, strict=True))
    # no adapters at all (the zero-shot backbone): nothing to cache
    fresh = SplitTensors(split.pixels, split.captions)
    embed_split(backbone, fresh, prefix_bytes=1e9)
    assert fresh.eval_prefix is None


def test_runs_cache_the_evaluation_prefix_unless_prefix_cache_is_off():
    assert RunConfig().eval_prefix_bytes == 4.0 * 2**30
    assert RunConfig(data_cache_gb=0.5).eval_prefix_bytes == 0.5 * 2**30
    assert RunConfig(prefix_cache=False).eval_prefix_bytes == 0.0
