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


def test_vit_b32_adapter_count_is_about_1_98m():
    # CLIPConfig() defaults are ViT-B/32: vision 12 x 768, text 12 x 512.
    cfg = CLIPConfig()
    adapters = AdapterSet(
        vision_dim=cfg.vision_config.hidden_size,
        text_dim=cfg.text_config.hidden_size,
        vision_blocks=list(range(cfg.vision_config.num_hidden_layers)),
        text_blocks=list(range(cfg.text_config.num_hidden_layers)),
        bottleneck=64,
    )
    # 12 x (2*768*64 + 64 + 768) + 12 x (2*512*64 + 64 + 512)
    assert count_parameters(adapters) == 1_982_976
