"""Staging the app for ``flwr run``: the FAB Flower builds from the staged directory is
the one it builds from the app directory itself, without walking ignored trees."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import collect_files, filter_paths_for_publish

from rcsr_flower.runtime.fab import app_files, stage_app

ROOT = Path(__file__).resolve().parents[1]


def test_staged_repository_builds_the_same_fab_bytes(tmp_path):
    staged = stage_app(ROOT, tmp_path / "app")
    assert build_fab_from_disk(staged) == build_fab_from_disk(ROOT)
    assert (staged / "pyproject.toml").is_file() and not (staged / ".venv").exists()


def _write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_same_files_as_flowers_filter_with_negations_symlinks_and_ignored_trees(tmp_path):
    app = tmp_path / "app"
    _write(app / ".gitignore", "big/\nlogs/\n!logs/keep.py\n*.tmp\nnested/ignored/\n")
    _write(app / "pyproject.toml", (ROOT / "pyproject.toml").read_text())
    # the project's fab-include names these types and its fab-exclude leaves docs/ out
    _write(app / "README.md")
    _write(app / "pkg" / "config.json", "{}")
    _write(app / "docs" / "cells" / "metrics.json", "{}")
    _write(app / "pkg" / "mod.py")
    _write(app / "pkg" / "scratch.tmp")
    _write(app / "nested" / "ignored" / "a.py")
    _write(app / "nested" / "kept" / "b.py")
    _write(app / "logs" / "keep.py")
    _write(app / "logs" / "drop.py")
    for i in range(50):
        _write(app / "big" / f"d{i % 5}" / f"f{i}.py")
    os.symlink(app / "pkg" / "mod.py", app / "pkg" / "link.py")

    expected = filter_paths_for_publish(collect_files(app))
    got = app_files(app)
    assert sorted(got) == sorted(expected)
    assert "pkg/mod.py" in got and "pkg/link.py" not in got and "big/d0/f0.py" not in got

    staged = stage_app(app, tmp_path / "staged")
    for rel in got:
        assert (staged / rel).read_bytes() == (app / rel).read_bytes()
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        names = fab.namelist()
    assert "pkg/config.json" in names and not any(n.startswith("docs/") for n in names)


def test_the_printed_command_names_the_app_and_the_run_uses_the_staged_copy(tmp_path, capsys):
    from rcsr_flower.runtime.launch import flwr_run_command

    staged = stage_app(ROOT, tmp_path / "app")
    cmd = flwr_run_command(staged, "conn", [], {"run-name": "x"}, staged_from=ROOT)
    assert cmd[4] == str(staged)
    printed = capsys.readouterr().out
    assert printed.startswith(f"$ flwr run {ROOT} conn --stream") and str(staged) not in printed
