"""Random-weight CLIP checkpoints of any shape, saved like a real one.

This machine cannot download ``openai/clip-vit-base-patch32``, but the loading path for it
must still be exercised: :func:`save_random_clip` writes a ``CLIPModel`` built from a
``CLIPConfig`` (``CLIPConfig()`` defaults are ViT-B/32), a CLIP-style tokenizer whose
``<|startoftext|>``/``<|endoftext|>`` ids are the config's (49406/49407 for B/32, as in
OpenAI's) and the OpenAI image preprocessing, all with ``save_pretrained``. The directory
then loads through :func:`rcsr_flower.backbones.clip.load_backbone` like any checkpoint.
Tests use it (ViT-B/32 adapter count, exactness, dynamic padding) and so does
``benchmarks/gpu_check.py`` (training steps at B/32 shape, no download).

The tokenizer is a small word-level BPE over :data:`WORDS`, padded with unused ids up to
the config's vocabulary: captions built from those words (:func:`random_captions`) come out
one token per word, close to the lengths OpenAI's BPE gives for COCO-style captions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_WORD_TEXT = (
    "a an the two three several some man woman men women person people child children boy "
    "girl dog dogs cat horse bird player group team crowd street road field beach water "
    "snow grass park building table kitchen room car bus train bike bicycle boat plane "
    "ball frisbee shirt hat jacket dress red blue green white black yellow orange brown "
    "small large young old standing sitting walking running riding playing holding eating "
    "looking jumping wearing carrying throwing is are on in at of with near next to behind "
    "front top down up over under along while and his her their its"
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


def clip_tokenizer(vocab_size: int = 49408, max_length: int = 77):
    """A ``CLIPTokenizer`` with ``</w>`` word ends and OpenAI's special-token layout.

    ``<|startoftext|>`` = ``vocab_size - 2`` and ``<|endoftext|>`` = ``vocab_size - 1``
    (also the pad token), like ``openai/clip-vit-*``; ids between the learned BPE and
    those two are unused.
    """
    from rcsr_flower.embedded.tiny_clip import SPECIAL_TOKENS, bpe_clip_tokenizer, learn_bpe

    learned, merges = learn_bpe(list(WORDS) * 2, vocab_size=100_000)
    symbols = ["<|unk|>", *(t for t in learned if t not in SPECIAL_TOKENS)]
    if len(symbols) > vocab_size - 2:
        raise ValueError(f"vocab_size {vocab_size} is too small for {len(symbols) + 2} tokens")
    vocab = {tok: i for i, tok in enumerate(symbols)}
    vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), vocab_size - 2)})
    bos, eos = vocab_size - 2, vocab_size - 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    return bpe_clip_tokenizer(vocab, merges, bos, eos, max_length)


def openai_image_processor(image_size: int = 224):
    """OpenAI CLIP's preprocessing (bicubic resize of the short side, centre crop, CLIP
    mean/std) at ``image_size``; the PIL implementation, as the loader uses."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def tiny_clip_config():
    """A CLIP of a few hundred thousand parameters with B/32's token layout (for smoke runs)."""
    from transformers import CLIPConfig

    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    return CLIPConfig(
        text_config=dict(**common, vocab_size=1024, bos_token_id=1022, eos_token_id=1023),
        vision_config=dict(**common, image_size=64, patch_size=32),
        projection_dim=64,
    )


def random_clip(config=None, seed: int = 0):
    """A ``CLIPModel`` with transformers' own random initialisation, seeded.

    ``config=None`` is ``CLIPConfig()``: ViT-B/32 (vision 12 x 768, patch 32, 224 px;
    text 12 x 512, 77 positions, vocabulary 49408; projection 512).
    """
    from transformers import CLIPConfig, CLIPModel

    config = config if config is not None else CLIPConfig()
    text = config.text_config
    if (text.bos_token_id, text.eos_token_id) != (text.vocab_size - 2, text.vocab_size - 1):
        raise ValueError(
            "random_clip expects OpenAI's token layout: bos_token_id = vocab_size - 2 and "
            f"eos_token_id = vocab_size - 1, got {text.bos_token_id}, {text.eos_token_id} "
            f"for vocab_size {text.vocab_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config).eval()


def save_random_clip(out_dir: str | os.PathLike, config=None, seed: int = 0) -> Path:
    """Write a random CLIP checkpoint (model, tokenizer, image processor) to ``out_dir``."""
    model = random_clip(config, seed)
    text, vision = model.config.text_config, model.config.vision_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    clip_tokenizer(text.vocab_size, text.max_position_embeddings).save_pretrained(out)
    openai_image_processor(vision.image_size).save_pretrained(out)
    return out


def random_captions(n: int, seed: int = 0, min_words: int = 8, max_words: int = 14) -> list[str]:
    """``n`` captions of ``min_words``..``max_words`` words from :data:`WORDS`, seeded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_words, max_words + 1, (n,), generator=g).tolist()
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
        for k in lengths
    ]
