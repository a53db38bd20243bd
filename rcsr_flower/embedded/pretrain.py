"""Pretrain the embedded tiny CLIP, a real Hugging Face CLIP checkpoint built here.

No CLIP weights can be downloaded here, so the project pretrains its own small CLIP on a
*pretrain* corpus whose attributes and phrasing are shifted from the *target* corpus the
federation uses (see ``rcsr_flower.embedded.corpus``). The federation is then a real domain
adaptation of a frozen pretrained backbone, as in the paper. The result is a standard
model directory (``config.json``, ``model.safetensors``, tokenizer, preprocessor config)
that loads through ``CLIPModel.from_pretrained`` exactly like ``openai/clip-vit-base-patch32``.

The repository ships the result (``embedded/tiny-clip/``); rebuild it with
``python -m rcsr_flower.embedded.assets pretrain`` (seeded, one thread; bit-identical on the same
machine and thread count — float reductions differ across thread counts and CPUs).

What makes it behave like real CLIP under adaptation: its BPE is learned from
the pretrain captions and the target corpus's train captions, so every target word is one
token and the longest target caption (28 tokens) fits the 40-token context; a quarter of
the pretraining texts join two captions of an image, so every position up to the context
is trained; and it is pretrained long enough (2,000 steps) for the learned temperature to
settle well below the adapters' τ = 0.07, as real CLIP's 0.01 is.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.embedded.tiny_clip import (
    TinyClipRecipe,
    build_config,
    build_image_processor,
    train_tokenizer,
)
from rcsr_flower.retrieval.evaluation import evaluate_retrieval, preprocess_split

log = logging.getLogger(__name__)


def pretrain_tiny_clip(
    out_dir: Path,
    corpus_json: Path,
    recipe: TinyClipRecipe,
    tokenizer_corpus_json: Path | None = None,
) -> dict:
    """Pretrain on the corpus at ``corpus_json`` and save a HF model directory to ``out_dir``.

    The tokenizer is learned from the pretrain captions plus, when given, the train
    captions of ``tokenizer_corpus_json`` (the target corpus: its words, not its pairs).
    """
    from transformers import CLIPModel

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    try:
        train = open_dataset(corpus_json, split="train")
        test = open_dataset(corpus_json, split="test")
        captions = [train.captions(i) for i in range(len(train))]
        words = [c for caps in captions for c in caps]
        if tokenizer_corpus_json is not None:
            extra = open_dataset(tokenizer_corpus_json, split="train")
            words += [c for i in range(len(extra)) for c in extra.captions(i)]
        tokenizer = train_tokenizer(words, recipe)
        model = CLIPModel(build_config(recipe, len(tokenizer)))
        processor = build_image_processor(recipe)
        backbone = Backbone(model, tokenizer, processor, torch.device("cpu"), "tiny-clip")

        pixels = preprocess_split(backbone, train, texts=False).pixels
        report = _train(backbone, pixels, captions, recipe)
        model.eval()
        report["pretrain_test"] = evaluate_retrieval(
            backbone, preprocess_split(backbone, test), None, batch_size=512
        )
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["logit_scale"] = float(model.logit_scale.detach())
        report["temperature"] = float(torch.exp(-model.logit_scale.detach()))
        report["vocab_size"] = len(tokenizer)
        report["recipe"] = asdict(recipe)

        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        (out_dir / "rcsr_pretrain.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        torch.set_num_threads(threads)


def _train(
    backbone, pixels: torch.Tensor, captions: list[list[str]], recipe: TinyClipRecipe
) -> dict:
    model = backbone.model
    model.train()
    gen = torch.Generator().manual_seed(recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
    )

    def lr_lambda(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    n = pixels.shape[0]
    losses = []
    start = time.perf_counter()
    for step in range(recipe.steps):
        idx = torch.randperm(n, generator=gen)[: recipe.batch_size]
        pick = torch.randint(0, 1 << 30, (len(idx), 2), generator=gen)
        join = torch.rand(len(idx), generator=gen) < recipe.long_caption_prob
        texts = [
            _training_text(captions[i], int(p[0]), int(p[1]), bool(j))
            for i, p, j in zip(idx.tolist(), pick, join, strict=True)
        ]
        z_i = backbone.image_features(pixels[idx])
        z_t = backbone.text_features(backbone.tokenize(texts))
        logits = model.logit_scale.exp().clamp(max=100) * z_i @ z_t.T
        target = torch.arange(len(idx))
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == recipe.steps - 1:
            log.info(
                "tiny-clip pretrain step %d/%d loss %.3f tau %.4f (%.0f s)",
                step,
                recipe.steps,
                losses[-1],
                float(torch.exp(-model.logit_scale.detach())),
                time.perf_counter() - start,
            )
    tail = losses[-20:] or [float("nan")]
    return {"final_loss": sum(tail) / len(tail), "steps": recipe.steps}


def _training_text(captions: list[str], a: int, b: int, join: bool) -> str:
    """One caption of an image, or (``join``) two different ones as one longer text."""
    first = captions[a % len(captions)]
    if not join or len(captions) < 2:
        return first
    rest = [c for k, c in enumerate(captions) if k != a % len(captions)]
    return f"{first}. {rest[b % len(rest)]}"
