"""Record a benchmark's figures, and write docs/benchmarks.md from the records.

    python -m benchmarks record round_overhead -- -c "num-server-rounds=3"
    python -m benchmarks page            # rewrite the generated block of docs/benchmarks.md
    python -m benchmarks page --check    # exit 1 when the page is not what the records give

``record`` runs ``benchmarks/<name>.py`` (or a script given by its path) with the
arguments after ``--``, shows its output as it comes, reads its last line of stdout as a
JSON object (every benchmark ends with one) and writes
``docs/results/benchmarks/<name>.json``: the command, the figures, the commit of this
checkout, the machine, the 1-minute load average before and after, the seconds it took.
``--name`` records the same script under another name (another device or setting), so
that both records stay. A script that fails, or whose last line is not a JSON object,
records nothing and exits non-zero.

``page`` writes one section per record between the page's ``benchmarks`` markers, and
lists every script in ``benchmarks/`` that has no record with the command that records
it: every figure on the page comes from a record, and a record from a run.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = ROOT / "docs" / "results" / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
NOT_BENCHMARKS = {"__init__", "__main__", "record"}
# arguments without which a script does not end with its JSON line (or runs nothing)
RECORD_ARGS: dict[str, list[str]] = {
    "adapter_ceiling": ["--json"],
    "fed_dynamics": ["--json"],
    "regime_search": ["run"],
}


class RecordError(Exception):
    """The benchmark failed or did not end with a JSON object; nothing was recorded."""


def benchmark_names() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in NOT_BENCHMARKS)


def script_path(script: str) -> Path:
    """``round_overhead`` names ``benchmarks/round_overhead.py``; anything else is a path."""
    if "/" not in script and not script.endswith(".py"):
        return BENCHMARKS / f"{script}.py"
    return Path(script).resolve()


def shown(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def record_command(script: str, args: list[str], name: str | None = None) -> str:
    """The command that records ``script`` with ``args`` (under ``name``)."""
    path = script_path(script)
    ref = path.stem if path.parent == BENCHMARKS else shown(path)
    cmd = ["python", "-m", "benchmarks", "record", ref]
    if name and name != path.stem:
        cmd += ["--name", name]
    return shlex.join([*cmd, "--", *args] if args else cmd)


def last_json(script: str, stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    try:
        figures = json.loads(last)
    except ValueError:
        figures = None
    if not isinstance(figures, dict):
        said = repr(last[:300]) if last else "nothing on stdout"
        raise RecordError(
            f"{script}: its last line of stdout is not a JSON object, so there are no "
            f"figures to record; it printed {said}"
        )
    return figures


def run(script: str, args: list[str]) -> tuple[dict, float]:
    """Run the script from the checkout's root, echoing its stdout; return its last line
    as a JSON object and the seconds it took."""
    path = script_path(script)
    if not path.is_file():
        raise RecordError(f"{shown(path)}: no such benchmark script")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(path), *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        out.append(line)
    code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        raise RecordError(f"{shown(path)} exited with status {code}; nothing was recorded")
    return last_json(shown(path), "".join(out)), seconds


def record(script: str, args: list[str], results: Path = RESULTS, name: str | None = None) -> Path:
    """Run ``script`` with ``args`` and write ``results/<name>.json``; return its path."""
    before = os.getloadavg()[0]  # before this process imports anything heavy
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from rcsr_flower.routing import provenance

    path = script_path(script)
    name = name or path.stem
    if not re.fullmatch(r"[\w.-]+", name):
        raise RecordError(f"{name!r}: a record's name is letters, digits, '_', '.' and '-'")
    # the code measured is the checkout as it is before the run; the records and the page
    # this tool writes do not make it dirty
    commit = provenance.commit(ROOT, ignore=(shown(RESULTS), shown(PAGE)))
    figures, seconds = run(script, args)
    after = os.getloadavg()[0]
    entry = {
        "benchmark": name,
        "script": shown(path),
        "args": args,
        "command": shlex.join(["python", shown(path), *args]),
        "record": record_command(script, args, name),
        "figures": figures,
        "commit": commit,
        "machine": provenance.machine(),
        "load": {"before": round(before, 2), "after": round(after, 2)},
        "seconds": round(seconds, 1),
        "recorded_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}.json"
    out.write_text(json.dumps(entry, indent=2) + "\n")
    return out


def load_records(results: Path = RESULTS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def summary(script: Path) -> str:
    """The first line of the script's module docstring, as Markdown."""
    try:
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0].replace("``", "`") if doc.strip() else ""


def value(v: object) -> str:
    if v is None:
        text = "—"
    elif isinstance(v, bool):
        text = str(v).lower()
    elif isinstance(v, int):
        text = str(v)
    elif isinstance(v, float):
        text = str(v) if not math.isfinite(v) else f"{v:.1f}" if abs(v) >= 1e4 else f"{v:.4g}"
    elif isinstance(v, list) and len(v) <= 8 and all(not isinstance(x, list | dict) for x in v):
        text = "[" + ", ".join(value(x) for x in v) + "]"
    elif isinstance(v, list | dict):
        text = json.dumps(v, separators=(",", ":"))
        if len(text) > 80:
            text = text[:77] + f"… ({len(v)} items)"
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def rows(figures: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested objects flattened to dotted keys; a list of objects (repeated runs, rounds)
    turned into one list per key, so that ``runs: [{"peak": 2.1}, {"peak": 2.2}]`` reads
    ``runs.peak | [2.1, 2.2]`` instead of a cut-off JSON string."""
    out = []
    for key, v in figures.items():
        key = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            v = {k: [x.get(k) for x in v] for k in dict.fromkeys(k for x in v for k in x)}
        if isinstance(v, dict) and v:
            out += rows(v, key)
        else:
            out.append((key, value(v)))
    return out


def section(entry: dict) -> list[str]:
    script = ROOT / entry["script"]
    load = entry["load"]
    lines = [f"## {entry['benchmark']}", ""]
    if about := summary(script):
        lines += [about, ""]
    lines += [
        f"- command: `{entry['command']}`",
        f"- recorded with: `{entry['record']}`",
        f"- commit: `{entry['commit']}`; machine: {entry['machine']}",
        f"- load (1-minute average): {load['before']} before, {load['after']} after; "
        f"{entry['seconds']} s",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {key} | {text} |" for key, text in rows(entry["figures"])),
        "",
        f"All of it: [results/benchmarks/{entry['benchmark']}.json]"
        f"(results/benchmarks/{entry['benchmark']}.json).",
        "",
    ]
    return lines


def block(records: list[dict]) -> str:
    lines = [
        START,
        "Generated by `python -m benchmarks page` from the records in "
        "`docs/results/benchmarks/` (`python -m benchmarks record`); do not edit by hand.",
        "",
    ]
    for entry in sorted(records, key=lambda e: e["benchmark"]):
        lines += section(entry)
    recorded = {e["script"] for e in records}
    missing = [n for n in benchmark_names() if f"benchmarks/{n}.py" not in recorded]
    if missing:
        lines += [
            "## Not recorded yet",
            "",
            "| benchmark | what it measures | records it |",
            "|---|---|---|",
        ]
        for n in missing:
            about = value(summary(BENCHMARKS / f"{n}.py"))
            command = value(record_command(n, RECORD_ARGS.get(n, [])))
            lines.append(f"| {n} | {about} | `{command}` |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def page(text: str, records: list[dict]) -> str:
    """``text`` with its generated block replaced by the records' block."""
    if START not in text or END not in text:
        raise RecordError(f"the page has no {START} ... {END} markers: add them")
    head, rest = text.split(START, 1)
    return head + block(records) + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, script_args = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "record",
        help="run a benchmark and record its last JSON line",
        description="Run a benchmark and record its last JSON line; the arguments after "
        "`--` go to the script: python -m benchmarks record NAME [--name N] -- [ARGS]",
    )
    r.add_argument("script", help="a name in benchmarks/ (round_overhead) or a script's path")
    r.add_argument("--name", help="record under this name (default: the script's)")
    r.add_argument("--results", type=Path, default=RESULTS, help="where records are written")
    p = sub.add_parser("page", help="write docs/benchmarks.md from the records")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=PAGE)
    p.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    if args.command != "record" and script_args:
        parser.error("arguments after -- are for `record` only")
    try:
        if args.command == "record":
            out = record(args.script, script_args, args.results, args.name)
            print(f"recorded {shown(out)}; `python -m benchmarks page` puts it on the page")
            return 0
        text = args.out.read_text() if args.out.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
        new = page(text, load_records(args.results))
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.check:
        if new != text:
            print(
                f"{shown(args.out)} is not what `python -m benchmarks page` writes from "
                f"{shown(args.results)}: run it",
                file=sys.stderr,
            )
            return 1
        print(f"{shown(args.out)} is up to date")
        return 0
    args.out.write_text(new)
    print(f"wrote {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
