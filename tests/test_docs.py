"""The docs describe the product: README's layout names every module a reader can open."""

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
