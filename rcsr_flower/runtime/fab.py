"""The files ``flwr run`` bundles into the app's FAB, staged in a small directory.

``flwr run APP`` walks every file under ``APP`` (and resolves each path) before it
applies ``.gitignore``: with the project's ``.venv`` inside the app directory that is
about 54,000 files, 3–7 s of every run on this machine (docs/development.md, "Where time
goes"), paid by each of the suite's hundred cells. Staging walks the tree with the
ignored directories pruned, keeps what Flower's own publish filter keeps, and copies
those few files (hard links where the filesystem allows) into a directory that
``flwr run`` then bundles into the same FAB.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns


def app_files(app_dir: Path) -> dict[str, Path]:
    """Relative POSIX path -> file of what Flower would publish from ``app_dir``.

    The same rules as Flower's ``collect_files`` + ``filter_paths_for_publish`` (the app's
    top-level ``.gitignore``, symlinks skipped), but an ignored directory is never
    entered unless a ``!`` pattern could bring something inside it back."""
    root = app_dir.resolve()
    gitignore = root / ".gitignore"
    patterns = load_gitignore_patterns(gitignore) if gitignore.is_file() else []
    spec = build_pathspec(patterns)
    negated = [p.lstrip("!").lstrip("/") for p in patterns if p.startswith("!")]
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [
            d
            for d in dirnames
            if not (
                spec.match_file(rel_dir + d + "/")
                and not any(n.startswith(rel_dir + d) for n in negated)
            )
        ]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            files[rel_dir + name] = path
    return filter_paths_for_publish(files)  # type: ignore[return-value]


def stage_app(app_dir: Path, into: Path) -> Path:
    """Copy the files Flower would publish from ``app_dir`` into the empty-or-new
    directory ``into`` (hard links when possible) and return it, ready for ``flwr run``."""
    into.mkdir(parents=True, exist_ok=True)
    for rel, src in app_files(app_dir).items():
        dst = into / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, dst)
    return into
