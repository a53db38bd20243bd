"""The embedded offline benchmark: generated corpus + pretrained tiny CLIP, built on first use.

``flwr run .`` must mean something on a machine with no hub access, so the default run
uses assets the project builds itself, deterministically, into a cache directory
(``cache-dir``, else ``$RCSR_CACHE_DIR``, else ``~/.cache/rcsr-flower``):

- ``corpus/``: the target image–caption corpus (Karpathy JSON + images) the federation uses;
- ``pretrain-corpus/``: a shifted corpus, only used to pretrain the backbone;
- ``tiny-clip/``: the pretrained backbone as a Hugging Face model directory.

Several processes may ask at once (the ServerApp and every Ray actor), so building holds
an exclusive file lock and every piece is written to a temporary sibling and renamed into
place: a reader sees a complete asset or none. Build explicitly with
``python -m rcsr_flower.assets build``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ASSETS_VERSION = "v2"  # v2: deterministic BPE; corpus v2 phrasing
_DONE = "rcsr_pretrain.json"


@dataclass(frozen=True)
class EmbeddedAssets:
    root: Path

    @property
    def corpus_json(self) -> Path:
        return self.root / "corpus" / "dataset.json"

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


def ensure_assets(
    cache_dir: str | os.PathLike | None = None, *, force: bool = False, in_process: bool = False
) -> EmbeddedAssets:
    """Return the embedded assets, building whatever is missing (under a lock).

    The build runs in a child interpreter unless ``in_process`` (the CLI itself).
    """
    assets = EmbeddedAssets(cache_root(cache_dir) / f"embedded-{ASSETS_VERSION}")
    if assets.complete and not force:
        return assets
    if not in_process:
        # Build in a fresh interpreter: the caller may be a ServerApp or a Ray actor whose
        # threads, signal handlers and connections must not be forked by the build's pool.
        _build_in_subprocess(assets.root.parent, force=force)
        if not assets.complete:
            raise RuntimeError(f"building the embedded assets in {assets.root} failed")
        return assets
    with file_lock(assets.root.parent / f"embedded-{ASSETS_VERSION}.lock"):
        if assets.complete and not force:  # another process built them while we waited
            return assets
        _build(assets, force=force)
    return assets


def _build_in_subprocess(cache_dir: Path, *, force: bool) -> None:
    import subprocess

    package_parent = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH")) if p
        ),
    }
    cmd = [sys.executable, "-m", "rcsr_flower.assets", "build", "--cache-dir", str(cache_dir)]
    if force:
        cmd.append("--force")
    subprocess.run(cmd, env=env, check=True)


def _build(assets: EmbeddedAssets, *, force: bool) -> None:
    from rcsr_flower.backbones.tiny_clip import TinyClipRecipe, pretrain_tiny_clip
    from rcsr_flower.data.corpus import CorpusSpec, generate_corpus

    assets.root.mkdir(parents=True, exist_ok=True)
    if force:
        for sub in ("corpus", "pretrain-corpus", "tiny-clip"):
            shutil.rmtree(assets.root / sub, ignore_errors=True)
    recipe = TinyClipRecipe()
    log.info("building embedded target corpus in %s", assets.root / "corpus")
    generate_corpus(assets.root / "corpus", CorpusSpec())
    if not (assets.backbone_dir / _DONE).is_file():
        log.info("building pretrain corpus in %s", assets.root / "pretrain-corpus")
        generate_corpus(assets.root / "pretrain-corpus", recipe.corpus)
        tmp = assets.root / "tiny-clip.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("pretraining the embedded tiny CLIP (one-time, about a minute)")
        report = pretrain_tiny_clip(tmp, assets.pretrain_corpus_json, recipe)
        shutil.rmtree(assets.backbone_dir, ignore_errors=True)
        os.replace(tmp, assets.backbone_dir)
        log.info("tiny CLIP ready: %s", json.dumps(report.get("pretrain_test", {})))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rcsr_flower.assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["build", "info", "path"])
    parser.add_argument(
        "--cache-dir", default=None, help="default: $RCSR_CACHE_DIR or ~/.cache/rcsr-flower"
    )
    parser.add_argument("--force", action="store_true", help="rebuild from scratch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "path":
        print(cache_root(args.cache_dir) / f"embedded-{ASSETS_VERSION}")
        return 0
    if args.command == "build":
        assets = ensure_assets(args.cache_dir, force=args.force, in_process=True)
    else:
        assets = EmbeddedAssets(cache_root(args.cache_dir) / f"embedded-{ASSETS_VERSION}")
        if not assets.complete:
            print(f"not built yet: {assets.root} (run `python -m rcsr_flower.assets build`)")
            return 1
    report = assets.pretrain_report()
    print(f"corpus:   {assets.corpus_json}")
    print(f"backbone: {assets.backbone_dir}")
    print(f"pretrain: {report['seconds']} s, test {json.dumps(report['pretrain_test'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
