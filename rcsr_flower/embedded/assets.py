"""The embedded offline benchmark: generated corpus + pretrained tiny CLIP, built on first use.

``flwr run .`` must mean something on a machine with no hub access, so the default run
uses assets the project builds itself, deterministically, into a cache directory
(``cache-dir``, else ``$RCSR_CACHE_DIR``, else ``~/.cache/rcsr-flower``):

- ``corpus/``: the target image–caption corpus (Karpathy JSON + images) the federation uses;
- ``pretrain-corpus/``: a shifted corpus, only used to pretrain the backbone;
- ``tiny-clip/``: the pretrained backbone as a Hugging Face model directory.

Pretraining the backbone to convergence takes longer than a cold run may (about 20 min
on 2 CPU cores), so the repository ships it, built by
``python -m rcsr_flower.embedded.assets pretrain`` (seed 0, 2 threads) into ``embedded/tiny-clip/``
at the repository root (weights in ``model.safetensors``, which the Flower app bundle does
not pick up). A build copies it into the cache after checking its SHA-256 and that it was
built from today's recipe; without it (or if either check fails) the build pretrains.

Several processes may ask at once (the ServerApp and every Ray actor), so building holds
an exclusive file lock and every piece is written to a temporary sibling and renamed into
place: a reader sees a complete asset or none. Build explicitly with
``python -m rcsr_flower.embedded.assets build``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ASSETS_VERSION = "v3"  # v3: converged backbone, context 40, target words in the BPE
_DONE = "rcsr_pretrain.json"

SHIPPED_BACKBONE = Path(__file__).resolve().parents[2] / "embedded" / "tiny-clip"
"""The backbone built by ``python -m rcsr_flower.embedded.assets pretrain``, shipped in the
repository."""
# sha256 of SHIPPED_BACKBONE/model.safetensors
SHIPPED_SHA256 = "832e2620edbbe384eb09a2546f01a1da8e03cdec23d25d1c998af54d86a574b0"


DEFAULT_TRAIN_ITEMS = 6000  # CorpusSpec().n_train, the target corpus's training items


@dataclass(frozen=True)
class EmbeddedAssets:
    """Where one version's assets live; ``train_items`` picks the target corpus: the
    default one (``corpus/``) or a larger one for many clients beside it
    (``corpus-train<N>/``, ``corpus.ExtendedCorpusSpec``), built on demand."""

    root: Path
    train_items: int = DEFAULT_TRAIN_ITEMS

    @property
    def corpus_dir(self) -> Path:
        if self.train_items == DEFAULT_TRAIN_ITEMS:
            return self.root / "corpus"
        return self.root / f"corpus-train{self.train_items}"

    @property
    def corpus_json(self) -> Path:
        return self.corpus_dir / "dataset.json"

    @property
    def pretrain_corpus_json(self) -> Path:
        return self.root / "pretrain-corpus" / "dataset.json"

    @property
    def backbone_dir(self) -> Path:
        return self.root / "tiny-clip"

    @property
    def complete(self) -> bool:
        return self.corpus_json.is_file() and (self.backbone_dir / _DONE).is_file()

    def pretrain_report(self) -> dict:
        return json.loads((self.backbone_dir / _DONE).read_text())


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the embedded assets live; the same rule for server, clients and CLI."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RCSR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rcsr-flower"


def embedded_assets(
    cache_dir: str | os.PathLike | None = None, train_items: int = DEFAULT_TRAIN_ITEMS
) -> EmbeddedAssets:
    """Where this version's embedded assets are (or will be) in the cache; builds nothing."""
    return EmbeddedAssets(cache_root(cache_dir) / f"embedded-{ASSETS_VERSION}", train_items)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes (released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ShippedBackboneError(RuntimeError):
    """The tiny CLIP shipped in ``embedded/tiny-clip/`` is missing, corrupted or stale."""


def ensure_assets(
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    in_process: bool = False,
    pretrain: bool = False,
    train_items: int = DEFAULT_TRAIN_ITEMS,
) -> EmbeddedAssets:
    """Return the embedded assets, building whatever is missing (under a lock).

    The build runs in a child interpreter unless ``in_process`` (the CLI itself). The
    backbone is the shipped one, checked by SHA-256; one that fails the check is a
    :class:`ShippedBackboneError`, unless ``pretrain`` asks to pretrain one here instead.
    ``train_items`` (run-config ``embedded-train-items``): the target corpus with that many
    training items, the default one or a larger one built beside it.
    """
    assets = embedded_assets(cache_dir, train_items)
    if assets.complete and not force:
        return assets
    if not in_process:
        # Build in a fresh interpreter: the caller may be a ServerApp or a Ray actor whose
        # threads, signal handlers and connections must not be forked by the build's pool.
        try:
            _build_in_subprocess(
                assets.root.parent, force=force, pretrain=pretrain, train_items=train_items
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"building the embedded assets in {assets.root} failed (exit {exc.returncode}; "
                "its error is printed above)"
            ) from None
        if not assets.complete:
            raise RuntimeError(f"building the embedded assets in {assets.root} failed")
        return assets
    with file_lock(assets.root.parent / f"embedded-{ASSETS_VERSION}.lock"):
        if assets.complete and not force:  # another process built them while we waited
            return assets
        _build(assets, force=force, pretrain=pretrain)
    return assets


def load_model(name_or_path: str, device=None, cache_dir: str | os.PathLike | None = None):
    """A run's ``model-name`` as a frozen ``Backbone``: ``"embedded"`` is the project's
    tiny CLIP (checked and put in the cache on first use), anything else a hub id or a
    local checkpoint directory (``backbones.clip.load_backbone``)."""
    from rcsr_flower.backbones.clip import EMBEDDED, load_backbone

    if name_or_path == EMBEDDED:
        path = str(ensure_assets(cache_dir).backbone_dir)
        return load_backbone(path, device, name=name_or_path)
    return load_backbone(name_or_path, device)


def _build_in_subprocess(
    cache_dir: Path, *, force: bool, pretrain: bool = False, train_items: int = DEFAULT_TRAIN_ITEMS
) -> None:
    package_parent = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH")) if p
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "rcsr_flower.embedded.assets",
        "build",
        "--cache-dir",
        str(cache_dir),
    ]
    if force:
        cmd.append("--force")
    if pretrain:
        cmd.append("--pretrain")
    if train_items != DEFAULT_TRAIN_ITEMS:
        cmd += ["--train-items", str(train_items)]
    subprocess.run(cmd, env=env, check=True)


def _build(assets: EmbeddedAssets, *, force: bool, pretrain: bool = False) -> None:
    from rcsr_flower.embedded.corpus import CorpusSpec, generate_corpus, target_spec
    from rcsr_flower.embedded.pretrain import pretrain_tiny_clip
    from rcsr_flower.embedded.tiny_clip import TinyClipRecipe

    assets.root.mkdir(parents=True, exist_ok=True)
    if force:
        for sub in ("corpus", "pretrain-corpus", "tiny-clip", assets.corpus_dir.name):
            shutil.rmtree(assets.root / sub, ignore_errors=True)
    recipe = TinyClipRecipe()
    needs_backbone = not (assets.backbone_dir / _DONE).is_file()
    problem = shipped_backbone_problem(SHIPPED_BACKBONE, recipe) if needs_backbone else None
    if problem is not None and not pretrain:  # before anything is built
        raise ShippedBackboneError(
            f"the shipped tiny CLIP cannot be used: {problem} (expected SHA-256 of "
            f"{SHIPPED_BACKBONE / 'model.safetensors'}: {SHIPPED_SHA256}). Restore it "
            "from the repository (git checkout -- embedded/tiny-clip), or pretrain one "
            "into the cache with `python -m rcsr_flower.embedded.assets build --pretrain` (about "
            "an hour on 2 CPU cores)"
        )
    log.info("building embedded target corpus in %s", assets.corpus_dir)
    generate_corpus(assets.corpus_dir, target_spec(assets.train_items))
    if needs_backbone:
        tmp = assets.root / "tiny-clip.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is None:
            log.info("copying the shipped tiny CLIP from %s", SHIPPED_BACKBONE)
            shutil.copytree(SHIPPED_BACKBONE, tmp)
        else:
            log.warning("not using the shipped tiny CLIP (%s): pretraining it here", problem)
            log.info("building pretrain corpus in %s", assets.root / "pretrain-corpus")
            generate_corpus(assets.root / "pretrain-corpus", recipe.corpus)
            # the recipe's tokenizer learns the default target corpus's words, whichever
            # corpus this build is for
            target = generate_corpus(assets.root / "corpus", CorpusSpec())
            log.info("pretraining the embedded tiny CLIP (one-time, about an hour on 2 cores)")
            pretrain_tiny_clip(tmp, assets.pretrain_corpus_json, recipe, target)
        shutil.rmtree(assets.backbone_dir, ignore_errors=True)
        os.replace(tmp, assets.backbone_dir)
        log.info("tiny CLIP ready: %s", json.dumps(assets.pretrain_report()["pretrain_test"]))


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_backbone_problem(directory: Path, recipe) -> str | None:
    """Why the backbone in ``directory`` cannot stand for ``recipe``'s, or None if it can."""
    from dataclasses import asdict

    weights, report = directory / "model.safetensors", directory / _DONE
    if not weights.is_file() or not report.is_file():
        return f"{directory} has no model.safetensors or {_DONE}"
    if sha256_file(weights) != SHIPPED_SHA256:
        return f"{weights} does not have the SHA-256 recorded in rcsr_flower/embedded/assets.py"
    if json.loads(report.read_text()).get("recipe") != json.loads(json.dumps(asdict(recipe))):
        return "it was built from another recipe than TinyClipRecipe()"
    return None


def pretrain_shipped_backbone(out_dir: Path, cache_dir: str | os.PathLike | None = None) -> dict:
    """Pretrain the embedded backbone from scratch into ``out_dir`` (the shipped one's recipe).

    The corpora come from the cache (built if missing); bit-identical to the shipped
    backbone on the machine and thread count it was built with.
    """
    from rcsr_flower.embedded.corpus import CorpusSpec, generate_corpus
    from rcsr_flower.embedded.pretrain import pretrain_tiny_clip
    from rcsr_flower.embedded.tiny_clip import TinyClipRecipe

    root = embedded_assets(cache_dir).root
    recipe = TinyClipRecipe()
    with file_lock(root.parent / f"embedded-{ASSETS_VERSION}.lock"):
        target = generate_corpus(root / "corpus", CorpusSpec())
        pretrain = generate_corpus(root / "pretrain-corpus", recipe.corpus)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    report = pretrain_tiny_clip(tmp, pretrain, recipe, target)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return report


def benchmark_info(assets: EmbeddedAssets) -> dict:
    """What the embedded benchmark is: truncation, temperature, in-domain and zero-shot rsum.

    Truncation is counted on the target corpus with the backbone's own tokenizer and text
    context; ``zero_shot_rsum`` is the frozen backbone on the target test split (standard
    protocol, every test image), i.e. round 0 of the default run.
    """
    from rcsr_flower.backbones.clip import load_backbone
    from rcsr_flower.data.datasets import open_dataset
    from rcsr_flower.retrieval.evaluation import evaluate_retrieval, preprocess_split

    report = assets.pretrain_report()
    backbone = load_backbone(str(assets.backbone_dir), device="cpu")
    context = backbone.max_text_length
    info: dict = {"context": context, "vocab_size": len(backbone.tokenizer)}
    for split in ("train", "test"):
        data = open_dataset(assets.corpus_json, split=split)
        captions = [c for i in range(len(data)) for c in data.captions(i)]
        lengths = [len(ids) for ids in backbone.tokenizer(captions)["input_ids"]]
        info[f"truncated_{split}_captions"] = sum(n > context for n in lengths)
        info[f"{split}_captions"] = len(captions)
        info[f"max_{split}_caption_tokens"] = max(lengths)
    test = preprocess_split(backbone, open_dataset(assets.corpus_json, split="test"))
    logit_scale = float(backbone.model.logit_scale.detach())
    zero_shot = evaluate_retrieval(backbone, test, None)
    info.update(
        logit_scale=logit_scale,
        temperature=math.exp(-logit_scale),
        in_domain_rsum=report["pretrain_test"]["rsum"],
        zero_shot_rsum=zero_shot["rsum"],
        zero_shot_share_of_in_domain=zero_shot["rsum"] / report["pretrain_test"]["rsum"],
        pretrain_steps=report["steps"],
        pretrain_seconds=report["seconds"],
        pretrain_final_loss=report["final_loss"],
        backbone_sha256=sha256_file(assets.backbone_dir / "model.safetensors"),
        backbone=str(assets.backbone_dir),
        corpus=str(assets.corpus_json),
    )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rcsr_flower.embedded.assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["build", "info", "path", "pretrain"])
    parser.add_argument(
        "--cache-dir", default=None, help="default: $RCSR_CACHE_DIR or ~/.cache/rcsr-flower"
    )
    parser.add_argument("--force", action="store_true", help="rebuild from scratch")
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="build: pretrain the tiny CLIP here when the shipped one fails its check",
    )
    parser.add_argument(
        "--train-items",
        type=int,
        default=DEFAULT_TRAIN_ITEMS,
        help="build/path: the target corpus with this many training items (run-config "
        "embedded-train-items; default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="info: one JSON object on stdout")
    parser.add_argument(
        "--out",
        type=Path,
        default=SHIPPED_BACKBONE,
        help="pretrain: where the backbone goes (default: the shipped one, %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.command == "path":
        print(embedded_assets(args.cache_dir, args.train_items).root)
        return 0
    if args.command == "pretrain":
        report = pretrain_shipped_backbone(args.out, args.cache_dir)
        print(json.dumps({k: v for k, v in report.items() if k != "recipe"}))
        print(
            f"sha256 of {args.out / 'model.safetensors'}: "
            f"{sha256_file(args.out / 'model.safetensors')}"
        )
        return 0
    if args.command == "build":
        try:
            assets = ensure_assets(
                args.cache_dir,
                force=args.force,
                in_process=True,
                pretrain=args.pretrain,
                train_items=args.train_items,
            )
        except ShippedBackboneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        assets = embedded_assets(args.cache_dir, args.train_items)
        if not assets.complete:
            print(
                f"not built yet: {assets.root} (run `python -m rcsr_flower.embedded.assets build`)"
            )
            return 1
    if args.json:
        print(json.dumps(benchmark_info(assets)))
        return 0
    report = assets.pretrain_report()
    print(f"corpus:   {assets.corpus_json}")
    print(f"backbone: {assets.backbone_dir}")
    print(
        f"pretrain: {report['steps']} steps in {report['seconds']} s when it was built, "
        f"in-domain test {json.dumps(report['pretrain_test'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
