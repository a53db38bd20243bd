"""The docs describe the product: README's layout names every module a reader can open."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_layout_names_every_module_and_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1]
    missing = []
    for path in sorted((ROOT / "rcsr_flower").rglob("*.py")):
        if path.name == "__init__.py":
            name = path.parent.name + "/"
            if path.parent.name == "rcsr_flower":
                name = "rcsr_flower/"
        else:
            name = path.name
        if name not in layout:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README's layout does not name: {missing}"


def test_the_specification_is_inside_the_repository():
    """Code and docs cite the specification's sections; it must be a file a clone has."""
    spec = (ROOT / "docs" / "algorithm.md").read_text()
    for section in ("## §1 Setting", "## §2 Model", "## §3 Prototypes", "## §4 Client round",
                    "## §5 Server round", "## §6 Evaluation"):  # fmt: skip
        assert section in spec
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "shared/docs/algorithm.md" not in doc.read_text(), doc.name


HISTORY = re.compile(
    r"\b[Ii]ssue \d+|\b20\d\d-\d\d-\d\d\b|\bthis (?:2-core )?VM\b|\b(?:EPYC|Xeon)\b"
    r"|\bcommits? [0-9a-f]{7,}\b|\b(?:at|since|before|after) [0-9a-f]{7,10}\b"
    r"|\b(?:earlier|this) session"
)
GENERATED = re.compile(r"<!-- ([\w:-]+):start -->.*?<!-- \1:end -->", re.S)


def test_hand_written_docs_and_docstrings_describe_the_product_not_its_history():
    """No commit hashes, dates, machine descriptions, issue numbers or session talk outside
    generated blocks (which keep their provenance: command, commit, machine, load)."""
    found = []
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    texts += [*(ROOT / "rcsr_flower").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    texts += [ROOT / "server_app.py", ROOT / "client_app.py"]
    for path in texts:
        text = GENERATED.sub("", path.read_text())
        for n, line in enumerate(text.splitlines(), 1):
            if m := HISTORY.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r} in {line.strip()[:80]}")
    assert not found, "\n".join(found)
