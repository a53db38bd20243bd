import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from rcsr_flower.backbones.adapters import AdapterSet, adapted, adapted_blocks, count_parameters


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(
            **common,
            vocab_size=50,
            max_position_embeddings=16,
            eos_token_id=1,
            bos_token_id=0,
            pad_token_id=1,
        ),
        vision_config=dict(**common, image_size=16, patch_size=8),
        projection_dim=24,
    )
    return CLIPModel(cfg).eval().requires_grad_(False)


def embed(model, pixels, ids, *sets):
    with adapted(model, *sets):
        zi = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        zt = model.text_projection(
            model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
        )
    return zi, zt


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (4, 7), generator=g)
    ids[:, 0], ids[:, -1] = 0, 1
    return torch.randn(4, 3, 16, 16, generator=g), ids


def test_zero_initialised_adapters_reproduce_the_backbone_exactly(tiny_model):
    pixels, ids = inputs()
    ref = embed(tiny_model, pixels, ids)
    adapters = AdapterSet.for_model(tiny_model)
    out = embed(tiny_model, pixels, ids, adapters)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])


def test_trained_adapters_change_outputs_and_hooks_are_removed(tiny_model):
    pixels, ids = inputs()
    ref = embed(tiny_model, pixels, ids)
    adapters = AdapterSet.for_model(tiny_model)
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = embed(tiny_model, pixels, ids, adapters)
    assert not torch.allclose(ref[0], out[0]) and not torch.allclose(ref[1], out[1])
    after = embed(tiny_model, pixels, ids)  # outside the block: the bare backbone again
    assert torch.equal(ref[0], after[0]) and torch.equal(ref[1], after[1])


def test_shared_plus_personal_adapters_sum(tiny_model):
    pixels, ids = inputs()
    shared, personal = AdapterSet.for_model(tiny_model), AdapterSet.for_model(tiny_model)
    for p in [*shared.parameters(), *personal.parameters()]:
        torch.nn.init.normal_(p, std=0.1)
    both = embed(tiny_model, pixels, ids, shared, personal)
    assert not torch.allclose(both[0], embed(tiny_model, pixels, ids, shared)[0])
    # zeroing the personal up-projections gives back the shared-only model
    for name, p in personal.named_parameters():
        if ".up." in name:
            torch.nn.init.zeros_(p)
    shared_only = embed(tiny_model, pixels, ids, shared)
    again = embed(tiny_model, pixels, ids, shared, personal)
    assert torch.equal(shared_only[0], again[0]) and torch.equal(shared_only[1], again[1])


def test_gradients_reach_only_adapters(tiny_model):
    pixels, ids = inputs()
    adapters = AdapterSet.for_model(tiny_model)
    zi, zt = embed(tiny_model, pixels, ids, adapters)
    (zi.sum() + zt.sum()).backward()
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.grad is not None for p in adapters.parameters())


def test_last_l_blocks_placement():
    assert adapted_blocks(12, "all") == list(range(12))
    assert adapted_blocks(12, "4") == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="only 12 blocks"):
        adapted_blocks(12, "13")


def test_vit_b32_adapter_count_is_about_1_98m(vit_b32):
    # A B/32 checkpoint built from CLIPConfig() defaults, saved with save_pretrained and
    # loaded by path through load_backbone, as openai/clip-vit-base-patch32 would be.
    cfg, default = vit_b32.model.config, CLIPConfig()
    for ours, ref in (
        (cfg.vision_config, default.vision_config),
        (cfg.text_config, default.text_config),
    ):
        assert (
            ours.hidden_size == ref.hidden_size and ours.num_hidden_layers == ref.num_hidden_layers
        )
    assert (cfg.vision_config.hidden_size, cfg.vision_config.patch_size) == (768, 32)
    assert (cfg.text_config.hidden_size, cfg.text_config.max_position_embeddings) == (512, 77)
    assert type(vit_b32.tokenizer).__name__ == "CLIPTokenizer"
    assert "CLIPImageProcessor" in type(vit_b32.image_processor).__name__
    assert count_parameters(vit_b32.model) == 151_277_313  # ViT-B/32 CLIP: about 151 M
    adapters = vit_b32.new_adapters("all", bottleneck=64)
    # 12 x (2*768*64 + 64 + 768) + 12 x (2*512*64 + 64 + 512)
    assert count_parameters(adapters) == 1_982_976


def test_zero_initialised_adapters_reproduce_clipmodel_embeddings_on_vit_b32(vit_b32):
    """Round 0 is the real CLIPModel: same image and text embeddings, bit for bit."""
    import PIL.Image

    model = vit_b32.model
    g = torch.Generator().manual_seed(3)
    images = [
        PIL.Image.fromarray(
            torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        )
        for h, w in ((240, 320), (500, 375))
    ]
    pixels = vit_b32.preprocess(images)
    assert pixels.shape == (2, 3, 224, 224)
    tokens = vit_b32.tokenize(["a man riding a horse on the beach", "two dogs"])
    adapters = vit_b32.new_adapters("all", bottleneck=64, init_std=0.02)
    assert all(a.up.weight.abs().sum() == 0 for a in adapters.adapters.values())
    with torch.no_grad():
        z_i = vit_b32.image_features(pixels, adapters)
        z_t = vit_b32.text_features(tokens, adapters)
        ref_i = model.get_image_features(pixel_values=pixels).pooler_output
        ref_t = model.get_text_features(**tokens).pooler_output
        full = model(pixel_values=pixels, **tokens)
    assert torch.equal(z_i, torch.nn.functional.normalize(ref_i, dim=-1))
    assert torch.equal(z_t, torch.nn.functional.normalize(ref_t, dim=-1))
    # CLIPModel.forward normalises its own way: equal up to the last bits
    assert torch.allclose(z_i, full.image_embeds, atol=1e-6)
    assert torch.allclose(z_t, full.text_embeds, atol=1e-6)


def test_two_threads_with_their_own_adapters_on_one_model_get_their_own_outputs(tiny_model):
    """One backbone serves a process (``load_backbone``): the server's central evaluation
    thread and an in-process client use it at once with different adapters. Hooks live
    on the shared model, so without the model's lock each forward would also run the
    other thread's adapters."""
    import threading

    pixels, ids = inputs()
    sets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        s = AdapterSet.for_model(tiny_model)
        for p in s.parameters():
            torch.nn.init.normal_(p, std=0.2)
        sets.append(s)
    expected = [embed(tiny_model, pixels, ids, s) for s in sets]
    start, wrong = threading.Barrier(2), []

    def work(k: int) -> None:
        start.wait()
        for _ in range(200):
            zi, zt = embed(tiny_model, pixels, ids, sets[k])
            if not (torch.allclose(zi, expected[k][0]) and torch.allclose(zt, expected[k][1])):
                wrong.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 400 forwards ran another thread's adapters"
