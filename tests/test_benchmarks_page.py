"""docs/benchmarks.md: figures come only from records, records only from benchmark runs
(``python -m benchmarks record``), and the committed page is what ``page`` writes."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "benchmarks_record", ROOT / "benchmarks" / "record.py"
)
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


def script(tmp_path: Path, body: str, name: str = "tiny_bench.py") -> Path:
    path = tmp_path / name
    path.write_text(f'"""A tiny benchmark: it echoes its arguments."""\n{textwrap.dedent(body)}')
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_record_writes_the_last_json_line_with_its_provenance(tmp_path, capsys):
    from rcsr_flower.routing import provenance

    bench = script(
        tmp_path,
        """
        import json, sys
        print("warming up")
        print(json.dumps({"args": sys.argv[1:], "plain_s": 1.5, "mode": {"ratio": 2.25}}))
        """,
    )
    results = tmp_path / "records"
    assert record.main(["record", str(bench), "--results", str(results), "--", "--x", "3"]) == 0
    assert "warming up" in capsys.readouterr().out  # the script's output is shown as it runs
    entry = json.loads((results / "tiny_bench.json").read_text())
    assert entry["figures"] == {"args": ["--x", "3"], "plain_s": 1.5, "mode": {"ratio": 2.25}}
    assert entry["command"] == f"python {bench} --x 3"
    assert entry["record"] == f"python -m benchmarks record {bench} -- --x 3"
    assert entry["commit"] == provenance.commit(ROOT, ignore=("docs/results/benchmarks",
                                                              "docs/benchmarks.md"))  # fmt: skip
    assert entry["machine"] == provenance.machine()
    assert set(entry["load"]) == {"before", "after"} and entry["seconds"] >= 0
    assert entry["recorded_utc"].endswith("+00:00")

    # --name keeps a second record of the same script
    assert record.main(["record", str(bench), "--name", "tiny-2", "--results", str(results)]) == 0
    second = json.loads((results / "tiny-2.json").read_text())
    assert second["figures"]["args"] == [] and second["benchmark"] == "tiny-2"
    assert "--name tiny-2" in second["record"]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ('print("3.2 s per round")\n', "'3.2 s per round'"),
        ('print("[1, 2]")\n', "'[1, 2]'"),  # JSON, but not an object
        ("", "nothing on stdout"),
        ('import sys; print("{}"); sys.exit(3)\n', "exited with status 3"),
    ],
)
def test_a_script_without_a_json_object_last_records_nothing_and_says_why(
    tmp_path, capsys, body, said
):
    bench = script(tmp_path, body)
    results = tmp_path / "records"
    assert record.main(["record", str(bench), "--results", str(results)]) == 1
    err = capsys.readouterr().err
    assert str(bench) in err and said in err, err
    assert not results.exists()


def test_the_command_line_exits_non_zero_when_there_is_nothing_to_record(tmp_path):
    bench = script(tmp_path, 'print("done in 3.2 s")\n')
    out = cli("record", str(bench), "--results", str(tmp_path / "records"))
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: {bench}: its last line of stdout is not a JSON object")
    assert "'done in 3.2 s'" in out.stderr and "done in 3.2 s" in out.stdout
    assert not (tmp_path / "records").exists()


def test_the_page_shows_records_and_lists_unrecorded_benchmarks_with_their_command():
    entry = {
        "benchmark": "prefix_cache-cuda",
        "script": "benchmarks/prefix_cache.py",
        "args": ["--device", "cuda"],
        "command": "python benchmarks/prefix_cache.py --device cuda",
        "record": "python -m benchmarks record prefix_cache --name prefix_cache-cuda -- "
        "--device cuda",
        "figures": {
            "ratio": 3.14159,
            "eval_same": True,
            "rows": {"a": 1, "b": None},
            "runs": [
                {"peak": 2.1, "load": {"before": 1.0}},
                {"peak": 2.2, "load": {"before": 3.0}},
            ],
            "rounds": [{"train": 1.5}, {"train": 2.5, "evaluate": 0.5}],
        },
        "commit": "0123456789",
        "machine": "16-core test CPU, 1× test GPU",
        "load": {"before": 0.5, "after": 1.25},
        "seconds": 12.3,
        "recorded_utc": "2000-01-01T00:00:00+00:00",
    }
    page = record.page(f"# B\n\nintro\n\n{record.START}\nold\n{record.END}\ntail\n", [entry])
    assert page.startswith("# B\n\nintro\n\n") and page.endswith("\ntail\n") and "old" not in page
    recorded, unrecorded = page.split("## Not recorded yet")
    assert "## prefix_cache-cuda" in recorded
    assert "What the frozen-prefix cache saves on a local epoch" in recorded
    for text in (
        "`python benchmarks/prefix_cache.py --device cuda`",
        "`0123456789`",
        "16-core test CPU, 1× test GPU",
        "0.5 before, 1.25 after; 12.3 s",
        "| ratio | 3.142 |",
        "| eval_same | true |",
        "| rows.a | 1 |",
        "| rows.b | — |",
        "| runs.peak | [2.1, 2.2] |",  # repeated runs: a list per figure
        "| runs.load.before | [1, 3] |",
        "| rounds.evaluate | [—, 0.5] |",  # a key one of them lacks
    ):
        assert text in recorded, text
    assert "2000" not in page  # the timestamp stays in the record
    # a benchmark counts as recorded under any name; every other one is listed, unmeasured
    assert "prefix_cache" not in unrecorded
    for name in record.benchmark_names():
        if name != "prefix_cache":
            row = next(line for line in unrecorded.splitlines() if line.startswith(f"| {name} |"))
            assert f"`python -m benchmarks record {name}" in row
    assert "| fed_dynamics |" in unrecorded and "record fed_dynamics -- --json`" in unrecorded


def test_every_benchmark_script_exists_and_the_recorder_is_not_one():
    names = record.benchmark_names()
    assert "round_overhead" in names and "record" not in names and "__main__" not in names
    assert set(record.RECORD_ARGS) <= set(names)
    for name in names:
        assert record.summary(ROOT / "benchmarks" / f"{name}.py"), f"{name}: no docstring"


def test_the_committed_page_is_what_page_writes_from_the_committed_records():
    """Like the experiment reports: regenerate, compare (`python -m benchmarks page`)."""
    text = record.PAGE.read_text()
    assert record.page(text, record.load_records()) == text, (
        "docs/benchmarks.md is stale: run `python -m benchmarks page`"
    )
    for name in record.benchmark_names():  # recorded under its name or another, or listed
        shown = (f"## {name}", f"| {name} |", f"command: `python benchmarks/{name}.py")
        assert any(s in text for s in shown), name


def test_page_check_fails_on_a_stale_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\n{record.START}\nstale\n{record.END}\n")
    empty = tmp_path / "records"
    empty.mkdir()
    args = ["--out", str(page), "--results", str(empty)]
    assert record.main(["page", *args, "--check"]) == 1
    assert record.main(["page", *args]) == 0
    assert record.main(["page", *args, "--check"]) == 0
    assert "Not recorded yet" in page.read_text()


def test_the_commit_is_dirty_for_code_changes_not_for_the_records(tmp_path):
    from rcsr_flower.routing import provenance

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "docs" / "results" / "benchmarks").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "benchmarks" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    ignore = ("docs/results/benchmarks", "docs/benchmarks.md")
    clean = provenance.commit(tmp_path, ignore)
    assert clean != "unknown" and not clean.endswith("+dirty")
    (tmp_path / "docs" / "results" / "benchmarks" / "a.json").write_text('{"a": 1}')
    assert provenance.commit(tmp_path, ignore) == clean
    assert provenance.commit(tmp_path) == clean + "+dirty"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.commit(tmp_path, ignore) == clean + "+dirty"
