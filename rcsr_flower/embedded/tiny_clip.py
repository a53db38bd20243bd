"""The embedded tiny CLIP's recipe, tokenizer and Hugging Face config (built here).

No CLIP weights can be downloaded here, so the project pretrains its own small CLIP
(``rcsr_flower.embedded.pretrain``) and ships it in ``embedded/tiny-clip/``. This module holds
what defines that checkpoint without training it: the recipe, the BPE tokenizer learned
from captions, the ``CLIPConfig`` and the image processor. It stands with the other
backbones, below the task: nothing here evaluates or trains.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from rcsr_flower.embedded.corpus import CorpusSpec

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")


@dataclass(frozen=True)
class TinyClipRecipe:
    """Architecture and pretraining schedule of the embedded backbone."""

    seed: int = 0
    corpus: CorpusSpec = field(
        default_factory=lambda: CorpusSpec(
            domain="pretrain", n_train=10000, n_val=0, n_test=1000, seed=1
        )
    )
    image_size: int = 64
    patch_size: int = 16
    width: int = 128
    layers: int = 4
    heads: int = 4
    projection_dim: int = 128
    # A cap: the BPE stops once every word of its text is one token (486 tokens here).
    vocab_size: int = 1024
    # Every target caption is at most 28 tokens with this tokenizer; 40 leaves room.
    max_text_length: int = 40
    # Pretrain captions are at most 24 tokens; this share of the training texts joins two
    # captions of the same image ("... . ..."), so every position up to the context is trained.
    long_caption_prob: float = 0.25
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 40
    weight_decay: float = 0.1
    threads: int = 1


ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-()"
_WORD_RE = re.compile(r"\w+|[^\w\s]+")  # what pre_tokenizers.Whitespace() splits on


def learn_bpe(captions: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple]]:
    """A deterministic BPE with CLIP's ``</w>`` word ends.

    ``tokenizers``' BpeTrainer breaks ties between equally frequent pairs in hash order,
    so two trainings on the same text can differ; here ties go to the lexicographically
    smallest pair, and the same captions always give the same vocabulary.
    """
    words = Counter(w for c in captions for w in _WORD_RE.findall(c.lower()))
    symbols = [*SPECIAL_TOKENS, *ALPHABET, *(ch + "</w>" for ch in ALPHABET)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(symbols))}
    split = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(words)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for w, parts in split.items():
            for pair in itertools.pairwise(parts):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for w, parts in split.items():
            out, k = [], 0
            while k < len(parts):
                if k + 1 < len(parts) and (parts[k], parts[k + 1]) == best:
                    out.append(parts[k] + parts[k + 1])
                    k += 2
                else:
                    out.append(parts[k])
                    k += 1
            split[w] = out
    return vocab, merges


def bpe_clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple], bos_id: int, eos_id: int, max_length: int
):
    """A ``CLIPTokenizer`` over a learned BPE: lower-cased, ``</w>`` word ends, the end token
    doubling as padding, as in OpenAI's checkpoints."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizer

    bpe = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<|unk|>", end_of_word_suffix="</w>")
    )
    bpe.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.decoder = decoders.BPEDecoder(suffix="</w>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos_id), ("<|endoftext|>", eos_id)],
    )
    return CLIPTokenizer(
        tokenizer_object=bpe,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=max_length,
    )


def train_tokenizer(captions: list[str], recipe: TinyClipRecipe):
    """A CLIP-style lower-cased BPE (``</w>`` word ends) learned from ``captions``.

    The embedded build learns it from the pretrain captions *and* the target corpus's train
    captions, as real CLIP's BPE covers Flickr30K's words: every target word is one token
    and no target caption outgrows the context. Words that occur only in the target corpus
    get a token whose embedding pretraining never trains, so the frozen backbone does not
    know what they mean; that is part of the domain shift adapters close.
    """
    vocab, merges = learn_bpe(captions, recipe.vocab_size)
    return bpe_clip_tokenizer(vocab, merges, 0, 1, recipe.max_text_length)


def build_config(recipe: TinyClipRecipe, vocab_size: int):
    from transformers import CLIPConfig

    common = dict(
        hidden_size=recipe.width,
        intermediate_size=4 * recipe.width,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
    )
    return CLIPConfig(
        text_config=dict(
            **common,
            vocab_size=vocab_size,
            max_position_embeddings=recipe.max_text_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(**common, image_size=recipe.image_size, patch_size=recipe.patch_size),
        projection_dim=recipe.projection_dim,
    )


def build_image_processor(recipe: TinyClipRecipe):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": recipe.image_size},
        crop_size={"height": recipe.image_size, "width": recipe.image_size},
    )
