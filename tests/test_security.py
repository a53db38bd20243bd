"""Nothing received from the network or read from disk is unpickled.

Replies are decoded by Flower's ``Array.numpy`` (``np.load(allow_pickle=False)``; the
strategy tests send a live pickle and check it is dropped unexecuted); checkpoints and
node snapshots are safetensors + JSON (test_checkpoint.py, test_client.py). This test
keeps it that way: the project's own code may not import a pickling module, call
``torch.load`` without ``weights_only=True``, or ``np.load`` with ``allow_pickle=True``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    [
        *ROOT.glob("rcsr_flower/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        *ROOT.glob("*_app.py"),
        *ROOT.glob("examples/**/*.py"),  # the example app decodes replies too
    ]
)
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names.append(getattr(node, "module", None) or "")
            found += [f"imports {n}" for n in names if n.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            loads = node.func.attr == "load"
            if loads and owner == "torch" and kwargs.get("weights_only") != "True":
                found.append("torch.load without weights_only=True")
            if (
                loads
                and owner in ("np", "numpy")
                and kwargs.get("allow_pickle", "False") != "False"
            ):
                found.append("np.load with allow_pickle")
            if node.func.attr == "read_pickle":
                found.append("read_pickle")
    return found


def test_the_scan_sees_what_it_forbids():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch, numpy as np\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
    )
    assert len(violations(bad)) == 5
    assert not violations("import torch\ntorch.load(f, weights_only=True)\nnp.load(f)\n")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unpickling_in_project_code(path):
    assert not violations(path.read_text()), path
