"""``python -m rcsr_flower.experiments run|report --suite NAME`` (docs/experiments.md).

run     every cell of experiments/NAME.toml as a real ``flwr run`` simulation, into
        outputs/experiments/NAME/<setting>/<method>/seed-<k>/; completed cells are
        skipped, cut-short ones continue from their checkpoint; exit code 0 only when
        every selected cell has completed (2: the suite itself is wrong, nothing ran)
report  copy the completed cells' small outputs to docs/results/NAME/cells/ and write
        docs/results/NAME/results.md and its figures from that archive

``python -m rcsr_flower.experiments compare RUN REFERENCE`` checks that a run's
metrics.jsonl equals a reference's (every field but ``seconds``, numbers within
``--tolerance``): ``make check-default-run`` compares a fresh default run with the one
whose table README shows.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rcsr_flower.experiments.suite import Suite, SuiteError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rcsr_flower.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite's cells (skipping completed ones)")
    report = sub.add_parser("report", help="write docs/results/<suite>/ from the cells")
    for p in (run, report):
        p.add_argument("--suite", required=True, help="a name under experiments/ or a .toml path")
        p.add_argument("--app-dir", default=".", help="the Flower app (this repository)")
        p.add_argument(
            "--output-root",
            default="outputs/experiments",
            help="cells go to <output-root>/<suite>/<setting>/<method>/seed-<k>",
        )
        p.add_argument(
            "--results-dir",
            default="docs/results",
            help="the report's <results-dir>/<suite>/; run skips cells completed in its cells/",
        )
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the suite's")
    run.add_argument(
        "--only",
        default=None,
        help="cells whose id (S4/rcsr/seed-0) matches: a shell pattern, else a substring",
    )
    run.add_argument("--flwr-home", default=None, help="default: .flwr/experiments/<suite>")
    run.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    report.add_argument(
        "--no-archive",
        action="store_true",
        help="draw from the archive as it is (e.g. a fresh clone), copying nothing into it",
    )
    report.add_argument(
        "--readme",
        default=None,
        help="also write the overview tables between the <!-- results:SUITE:start/end --> "
        "markers of this file (README.md)",
    )
    compare = sub.add_parser("compare", help="a run's metrics.jsonl against a reference's")
    compare.add_argument("run", type=Path, help="a run's output directory")
    compare.add_argument("reference", type=Path, help="the reference run's output directory")
    compare.add_argument("--tolerance", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(args.run, args.reference, args.tolerance)
    app_dir = Path(args.app_dir).resolve()
    try:
        suite = Suite.find(args.suite, app_dir)
        if args.command == "run":
            return _run(suite, app_dir, args)
        return _report(suite, app_dir, args)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _compare(run: Path, reference: Path, tolerance: float) -> int:
    from rcsr_flower.experiments.plot import RunRecord
    from rcsr_flower.routing.outputs import metrics_differences

    try:
        ours, theirs = RunRecord.load(run), RunRecord.load(reference)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    diffs = metrics_differences(ours.rows, theirs.rows, tolerance=tolerance)
    for line in diffs[:20]:
        print(line)
    if diffs:
        print(f"{len(diffs)} differences between {run} and {reference}", file=sys.stderr)
        return 1
    print(f"{run}: every round equals {reference} (all but seconds, within {tolerance})")
    return 0


def _run(suite: Suite, app_dir: Path, args: argparse.Namespace) -> int:
    from rcsr_flower.experiments.runner import run_suite

    cells = suite.cells(args.seeds, args.only)
    if not cells:
        raise SuiteError(f"suite {suite.name}: no cell matches --only {args.only!r}")
    suite.check(app_dir, cells)  # every key and value, before anything starts
    root = Path(args.output_root).resolve() / suite.name
    if args.dry_run:
        for cell in cells:
            print(f"{cell.id}  ({cell.num_supernodes} nodes)  {cell.overrides}")
        return 0
    # SIGTERM unwinds through run_suite's `finally`, which stops the SuperLink
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    flwr_home = Path(args.flwr_home or Path(".flwr", "experiments", suite.name)).resolve()
    archive = Path(args.results_dir) / suite.name / "cells"
    outcomes = run_suite(suite, cells, app_dir, root, flwr_home, archive=archive)
    return 0 if all(o.status != "failed" for o in outcomes) else 1


def _report(suite: Suite, app_dir: Path, args: argparse.Namespace) -> int:
    from rcsr_flower.experiments.report import (
        archive_cells,
        collect,
        completed_ids,
        readme_block,
        stale_cells,
        update_readme,
        write_report,
    )

    out_dir = Path(args.results_dir) / suite.name
    archive = out_dir / "cells"
    source = Path(args.output_root) / suite.name
    if not args.no_archive:
        copied = archive_cells(suite, source, archive) if source.is_dir() else []
        print(f"archived {len(copied)} completed cells from {source} into {archive}")
    stale = stale_cells(suite, archive, app_dir)
    if stale:
        print(f"left out {len(stale)} stale cells (run config changed since they ran)")
    if not completed_ids(collect(suite, archive, stale)):
        read = archive if args.no_archive else f"{source} (nor in {archive})"
        print(
            f"error: no completed cell of suite {suite.name} in {read}; run it first "
            f"(python -m rcsr_flower.experiments run --suite {suite.name}) or pass the "
            "--output-root that run used. Nothing was written.",
            file=sys.stderr,
        )
        return 1
    command = f"python -m rcsr_flower.experiments report --suite {suite.name}"
    if Path(args.output_root) != Path("outputs/experiments"):
        command += f" --output-root {args.output_root}"
    md = write_report(suite, archive, out_dir, command, Path(args.output_root), stale)
    print(f"wrote {md}, {out_dir / 'summary.json'} and the figures")
    if args.readme:
        readme = Path(args.readme)
        block = readme_block(suite, archive, f"{command} --readme {readme.name}", stale)
        try:
            changed = update_readme(readme, suite.name, block)
        except (OSError, ValueError) as exc:
            raise SuiteError(str(exc)) from exc
        print(f"{'updated' if changed else 'unchanged'}: the overview in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
