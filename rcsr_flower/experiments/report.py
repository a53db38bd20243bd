"""A suite's report: ``docs/results/<suite>/results.md`` and its figures, from cell outputs.

The report is drawn from an *archive* of the cells' small outputs,
``docs/results/<suite>/cells/<setting>/<method>/seed-<k>/`` (``metrics.jsonl``,
``config.json``, ``result.json``, ``clients.json``, ``provenance.json``), which is meant
to be committed. ``report`` first copies every completed cell of
``outputs/experiments/<suite>/`` into it (paths made relative, partition index lists
dropped), then writes the tables and figures from the archive alone. So a fresh clone
regenerates the identical ``results.md`` from the committed archive: nothing in it
depends on the clock, the checkout's path or the machine drawing it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from rcsr_flower.experiments.plot import (
    GROUPS,
    WEIGHT_KINDS,
    RunRecord,
    colour_map,
    footer_line,
    plot_curves,
    plot_group_bars,
    plot_weight_heatmap,
    plot_weights_by_client,
    read_clients,
    update_marked_block,
)
from rcsr_flower.experiments.stats import mean_std, paired_t
from rcsr_flower.experiments.suite import POOLED, Suite

CELL_FILES = ("metrics.jsonl", "config.json", "result.json", "provenance.json")
# run-config keys that hold paths of the machine that ran the cell
PATH_KEYS = ("output-dir", "resume-from", "cache-dir", "client-state-dir")


# ============================================================================ archive
def archive_cells(suite: Suite, source: Path, archive: Path) -> list[str]:
    """Copy the small outputs of every *completed* cell under ``source`` into
    ``archive`` (replacing that cell's previous copy); return the cell ids copied."""
    copied = []
    for cell in suite.cells():
        src = cell.directory(source)
        result = _json(src / "result.json")
        if not result or result.get("status") != "completed":
            continue
        dst = cell.directory(archive)
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for name in CELL_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
        config = _json(dst / "config.json")
        if config is not None:  # no absolute paths of the machine that ran it
            relative = Path("outputs", "experiments", suite.name, cell.setting, cell.method)
            for key in PATH_KEYS:
                if config.get(key):
                    config[key] = str(relative) if key == "output-dir" else "<machine path>"
            _write_json(dst / "config.json", config)
        clients = read_clients(src)
        _write_json(dst / "clients.json", {"clients": clients})
        copied.append(cell.id)
    return copied


def _missing_list(cells: list) -> str:
    """``S1/rcsr`` (seeds 1, 2), ...: one entry per setting and method, in suite order."""
    seeds: dict[str, list[int]] = {}
    for cell in cells:
        seeds.setdefault(f"{cell.setting}/{cell.method}", []).append(cell.seed)
    return ", ".join(
        f"`{name}` (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))})"
        for name, s in seeds.items()
    )


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ============================================================================ numbers
@dataclass
class MethodCells:
    """A method's completed cells in one setting, by seed."""

    name: str
    label: str
    pooled: bool
    runs: dict[int, RunRecord]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs)

    @property
    def has_global(self) -> bool:
        return all(r.has_global_model for r in self.runs.values())

    def final(self, key: str, metric: str = "rsum", group: str | None = None) -> dict[int, float]:
        """Per seed: the last round's ``key`` value (``global`` or ``personalized``;
        ``group`` a modality group, ``worst10`` its worst 10%)."""
        out = {}
        for seed, run in self.runs.items():
            value = pick(run.last(key), key, metric, group)
            if value is not None:
                out[seed] = value
        return out


def pick(record: dict | None, key: str, metric: str, group: str | None = None) -> float | None:
    """``metric`` of a round's ``key`` record: for ``personalized`` the mean over all
    clients, over modality ``group``'s clients, or (``group="worst10"``) over the worst
    10% of clients."""
    if not record:
        return None
    if key == "personalized":
        if group == "worst10":
            record = record.get("worst10", {})
        else:
            record = (record.get("by_group", {}).get(group) if group else record) or {}
            record = record.get("mean", {})
    return float(record[metric]) if metric in record else None


def stale_cells(suite: Suite, archive: Path, app_dir: Path) -> set[str]:
    """Ids of archived cells whose run config is not the one the cell runs with now (the
    code's defaults or the suite changed since): their numbers answer another question,
    so the report leaves them out and names them until they are run again."""
    from rcsr_flower.experiments.runner import config_changes, expected_config

    out = set()
    for cell in suite.cells():
        ran = _json(cell.directory(archive) / "config.json")
        if ran is not None and config_changes(
            ran, expected_config(app_dir, cell), set(cell.overrides)
        ):
            out.add(cell.id)
    return out


def collect(
    suite: Suite, archive: Path, stale: Collection[str] = ()
) -> dict[str, list[MethodCells]]:
    """Per setting: every method with at least one completed cell (pooled methods in
    every setting), leaving out the ``stale`` cell ids."""
    out: dict[str, list[MethodCells]] = {}
    for setting in suite.settings:
        rows = []
        for method in suite.methods:
            if not (method.pooled or method.runs_in(setting.name)):
                continue
            where = POOLED if method.pooled else setting.name
            runs = {}
            for seed in suite.seeds:
                if f"{where}/{method.name}/seed-{seed}" in stale:
                    continue
                path = archive / where / method.name / f"seed-{seed}"
                result = _json(path / "result.json")
                if result and result.get("status") == "completed":
                    runs[seed] = RunRecord.load(path)
            if runs:
                rows.append(MethodCells(method.name, method.label, method.pooled, runs))
        out[setting.name] = rows
    return out


def fmt(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "—"
    result = paired_t([a[s] for s in seeds], [b[s] for s in seeds])
    if result is None:
        return f"{a[seeds[0]] - b[seeds[0]]:+.1f} (1 seed: no interval)"
    return str(result)


# ============================================================================ report
def summary(suite: Suite, data: dict[str, list[MethodCells]]) -> dict:
    """The report's numbers as data (``summary.json``): per setting and method the final
    global rsum and personalised rsum per group (mean, sample std, seeds), and the paired
    difference to the suite's reference (``diff`` = reference − method, as in the tables)."""

    def stat(values: dict[int, float]) -> dict:
        if not values:
            return {"mean": None, "std": None, "n": 0}
        mean, std = mean_std(list(values.values()))
        return {
            "mean": round(mean, 3),
            "std": None if std is None else round(std, 3),
            "n": len(values),
        }

    def versus(a: dict[int, float], b: dict[int, float]) -> dict | None:
        seeds = sorted(set(a) & set(b))
        result = paired_t([a[s] for s in seeds], [b[s] for s in seeds]) if seeds else None
        if result is None:
            return None
        return {
            "diff": round(result.mean, 3),
            "ci": [round(result.low, 3), round(result.high, 3)],
            "p": round(result.p, 4),
            "n": result.n,
        }

    settings: dict[str, dict] = {}
    comparisons: dict[str, dict] = {}
    for name, rows in data.items():
        ref = next((m for m in rows if m.name == suite.reference), None)
        methods = {}
        for m in rows:
            entry: dict = {"global": stat(m.final("global") if m.has_global else {})}
            if not m.pooled:
                entry["personalised"] = {
                    "all": stat(m.final("personalized")),
                    **{g: stat(m.final("personalized", "rsum", g)) for g in GROUPS},
                }
            if ref is not None and m is not ref:
                vs: dict = {}
                if m.has_global and ref.has_global:
                    vs["global"] = versus(ref.final("global"), m.final("global"))
                if not m.pooled:
                    vs["personalised"] = versus(ref.final("personalized"), m.final("personalized"))
                entry["vs_reference"] = vs
            methods[m.name] = entry
        settings[name] = methods
        by_name = {m.name: m for m in rows}
        for a_name, b_name in suite.comparisons:
            a, b = by_name.get(a_name), by_name.get(b_name)
            if a is None or b is None:
                continue
            entry = {}
            if a.has_global and b.has_global:
                entry["global"] = versus(a.final("global"), b.final("global"))
            if not (a.pooled or b.pooled):
                entry["personalised"] = {
                    g or "all": versus(
                        a.final("personalized", "rsum", g), b.final("personalized", "rsum", g)
                    )
                    for g in (None, *GROUPS)
                }
            comparisons.setdefault(name, {})[f"{a_name} - {b_name}"] = entry
    out = {
        "suite": suite.name,
        "reference": suite.reference,
        "diff": "reference minus method, paired by seed (95% t interval, paired t-test p)",
        "metric": "rsum of the last round",
        "settings": settings,
    }
    if suite.comparisons:
        out["comparisons"] = comparisons  # "a - b": a minus b, paired by seed
    return out


def write_report(
    suite: Suite,
    archive: Path,
    out_dir: Path,
    command: str,
    source: Path | None = None,
    stale: Collection[str] = (),
) -> Path:
    """Tables and figures of the archived cells into ``out_dir`` (results.md,
    summary.json); returns results.md. ``source`` names where the cells were copied from;
    ``stale`` cells (:func:`stale_cells`) are left out and named."""
    data = collect(suite, archive, stale)
    runs = distinct_runs(data)
    configs = [r.config for r in runs]
    provenances = [r.provenance for r in runs if r.provenance]
    labels = [m.label for m in suite.methods]
    colours = colour_map(labels)
    footer = footer_line(configs, provenances, f"suite {suite.name}")
    reference = next((m for m in suite.methods if m.name == suite.reference), None)

    lines = [
        f"# Results: suite `{suite.name}`",
        "",
        f"Generated by `{command}` from the cell outputs in `cells/` "
        f"(copied there from `{source if source is not None else 'outputs/experiments'}/"
        f"{suite.name}/`); edit `experiments/{suite.name}.toml` or the code, not this file.",
        "",
    ]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += _provenance_lines(configs, provenances)
    expected = suite.cells()
    present = completed_ids(data)
    missing = [c for c in expected if c.id not in present]
    lines += [
        f"Cells: {len(expected) - len(missing)} of {len(expected)} completed "
        f"(seeds {', '.join(map(str, suite.seeds))}).",
        "",
    ]
    outdated = [c for c in missing if c.id in stale]
    missing = [c for c in missing if c.id not in stale]
    if missing:
        lines += [
            "**Missing cells** (not run yet, or failed: see their `run.log` under "
            f"`outputs/experiments/{suite.name}/`): " + _missing_list(missing),
            "",
        ]
    if outdated:
        lines += [
            "**Stale cells** (archived from a run with another configuration than the cell "
            "has now, left out until run again): " + _missing_list(outdated),
            "",
        ]
    lines += _reading_notes(suite, data)
    lines += ["## Overview: every setting", "", *overview(suite, data)]

    for setting in suite.settings:
        rows = data[setting.name]
        lines += [f"## {setting.label}", ""]
        if not rows:
            lines += ["No completed cells.", ""]
            continue
        lines += _setting_table(rows)
        if reference is not None:
            lines += _comparison_table(rows, reference.name)
        lines += _chosen_comparisons_table(rows, suite.comparisons)
        lines += _unimodal_weight_table(rows)
        lines += _update_alignment_table(rows)

    figures = _figures(suite, data, out_dir, colours, footer)
    if figures:
        lines += ["## Figures", ""]
        for path, caption in figures:
            lines += [f"**{caption}**", "", f"![{caption}]({path.name})", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text("\n".join(lines).rstrip() + "\n")
    _write_json(out_dir / "summary.json", summary(suite, data))
    return md


def distinct_runs(data: dict[str, list[MethodCells]]) -> list[RunRecord]:
    """Every completed cell once (a pooled method's cells stand in every setting's rows)."""
    runs = {r.path: r for rows in data.values() for m in rows for r in m.runs.values()}
    return list(runs.values())


def completed_ids(data: dict[str, list[MethodCells]]) -> set[str]:
    """Ids (``S4/rcsr/seed-0``, ``pooled/centralised/seed-0``) of the completed cells."""
    return {
        f"{POOLED if m.pooled else s}/{m.name}/seed-{seed}"
        for s, rows in data.items()
        for m in rows
        for seed in m.runs
    }


def _provenance_lines(configs: list[dict], provenances: list[dict]) -> list[str]:
    def counted(values: list[str]) -> str:
        distinct = sorted(set(values))
        if not distinct:
            return "not recorded"
        if len(distinct) == 1:
            return f"`{distinct[0]}`"
        return ", ".join(
            f"`{v}` ({values.count(v)} cell{'s' if values.count(v) > 1 else ''})" for v in distinct
        )

    from rcsr_flower.experiments.plot import backbone_name, load_range

    return [
        f"- backbone: {counted([backbone_name(c) for c in configs])}",
        f"- data: {counted([str(c.get('dataset')) for c in configs])}",
        f"- evaluation protocol: {counted([str(c.get('eval-protocol')) for c in configs])}, "
        f"global test split of {counted([str(c.get('eval-max-images')) for c in configs])} "
        "images (`eval-max-images`, 0 = all)",
        f"- rounds: {counted([str(c.get('num-server-rounds')) for c in configs])}",
        f"- machine: {counted([p.get('machine', '?') for p in provenances])}",
        f"- commit: {counted([p.get('commit', '?') for p in provenances])}",
        f"- load (1-minute average at each run's start and end): {load_range(provenances)}",
        "",
    ]


def _reading_notes(suite: Suite, data: dict[str, list[MethodCells]]) -> list[str]:
    notes = [
        "How to read the tables: values are the **last round**'s, mean ± standard "
        "deviation over seeds (no ± with one seed). *Global*: the server's adapters on the "
        "global test split (R@1 in %, rsum = R@1+5+10 both ways, max 600). *Personalised*: "
        "each client evaluates on its own local test split (both modalities), then the mean "
        "over the clients of each modality group at training time, and the mean of the "
        "worst 10% of clients. The zero-shot row is round 0, the frozen backbone (its "
        "personalised columns are empty for runs that did not evaluate the clients at round 0).",
        "",
    ]
    methods = {m.name: m for rows in data.values() for m in rows}
    if any(not m.has_global for m in methods.values()):
        notes += [
            "Local-only has **no global model**: the server never aggregates, its adapters "
            "stay the initial ones, so its global columns are left empty on purpose; compare "
            "it on the personalised columns.",
            "",
        ]
    if any(m.pooled for m in methods.values()):
        notes += [
            "Pooled methods (centralised) run once per seed on one node holding all the "
            "training data, with no setting applied, and are repeated in every setting's "
            "table; their personalised columns are empty: one client, whose local test "
            "split is a tenth of all data, is not comparable with the clients' splits.",
            "",
        ]
    limited = [m for m in suite.methods if m.settings is not None and m.name in methods]
    if limited:
        notes += [
            'Some methods run in some settings only (a "—" in their row elsewhere): '
            + "; ".join(f"{m.label} in {', '.join(m.settings)}" for m in limited)
            + ". Their notes say why.",
            "",
        ]
    notes += [m.note.strip() + "\n" for m in suite.methods if m.note.strip() and m.name in methods]
    return notes


def overview(
    suite: Suite,
    data: dict[str, list[MethodCells]],
    keys: tuple[str, ...] = ("global", "personalized"),
) -> list[str]:
    """Method × setting tables (global rsum; personalised rsum over all clients), the last
    round's mean ± std over seeds with the number of seeds: what a reader compares first;
    the README shows the global one (:func:`readme_block`)."""
    names = [s.name for s in suite.settings]
    methods = [m for m in suite.methods if any(r.name == m.name for s in names for r in data[s])]

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def cell(values: list[float]) -> str:
        return f"{fmt(values)} ({len(values)})" if values else "—"

    def zero_shot(setting: str, key: str) -> str:
        runs = zero_shot_runs(data[setting], key)
        return cell([pick(runs[s].at(0, key), key, "rsum") for s in sorted(runs)])

    head = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines = []
    for key, title, skip in (
        ("global", "Global rsum (the server's adapters on the global test split)", "local"),
        ("personalized", "Personalised rsum (mean over all clients)", "pooled"),
    ):
        if key not in keys:
            continue
        lines += [f"{title}, last round, mean ± std over seeds (seeds):", "", *head]
        lines.append(row("zero-shot (round 0)", [zero_shot(s, key) for s in names]))
        for method in methods:
            cells = []
            for s in names:
                m = next((r for r in data[s] if r.name == method.name), None)
                empty = m is None or (
                    m.pooled if skip == "pooled" else (key == "global" and not m.has_global)
                )
                cells.append("—" if empty else cell(list(m.final(key).values())))
            lines.append(row(method.label, cells))
        lines.append("")
    return lines


def readme_block(suite: Suite, archive: Path, command: str, stale: Collection[str] = ()) -> str:
    """The README's copy of the overview, between its ``results:<suite>`` markers."""
    data = collect(suite, archive, stale)
    expected = {c.id for c in suite.cells()}
    runs = distinct_runs(data)
    provenances = [r.provenance for r in runs if r.provenance]
    facts = [
        line.removeprefix("- ")
        for line in _provenance_lines([r.config for r in runs], provenances)
        if line
    ]
    lines = [
        f"Generated by `{command}` from {len(completed_ids(data) & expected)} of "
        f"{len(expected)} cells (`docs/results/{suite.name}/cells/`); do not edit by hand. "
        + "; ".join(facts)
        + ".",
        "",
        *overview(suite, data, keys=("global",)),
    ]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, suite_name: str, block: str) -> bool:
    """Replace the suite's overview between its markers in ``readme``; True if changed."""
    return update_marked_block(readme, suite_name, block)


def zero_shot_runs(rows: list[MethodCells], key: str) -> dict[int, RunRecord]:
    """Per seed, the first run with a round-0 ``key`` ("global" or "personalized") row.

    Round 0 (the frozen backbone) is the same for every method of a seed: the setting's
    partition and the global test split; a pooled method has a partition of its own."""
    zero: dict[int, RunRecord] = {}
    for m in rows:
        for seed, run in sorted(m.runs.items()):
            if not m.pooled and pick(run.at(0, key), key, "rsum") is not None:
                zero.setdefault(seed, run)
    return zero


def _setting_table(rows: list[MethodCells]) -> list[str]:
    head = (
        "| method | seeds | global rsum | i2t R@1 | t2i R@1 | "
        + " | ".join(f"pers. {g}" for g in ("all", *GROUPS))
        + " | pers. worst 10% |"
    )
    lines = [head, "|" + "---|" * (7 + len(GROUPS))]
    zero = zero_shot_runs(rows, "global")
    if zero:
        runs = [zero[s] for s in sorted(zero)]

        def column(key: str, metric: str, group: str | None = None) -> str:
            return fmt(
                [v for r in runs if (v := pick(r.at(0, key), key, metric, group)) is not None]
            )

        cells = [column("global", k) for k in ("rsum", "i2t_r1", "t2i_r1")]
        cells += [column("personalized", "rsum", g) for g in (None, *GROUPS, "worst10")]
        lines.append(f"| zero-shot (round 0) | {len(runs)} | " + " | ".join(cells) + " |")
    for m in rows:
        glob = [fmt(list(m.final("global", k).values())) for k in ("rsum", "i2t_r1", "t2i_r1")]
        if not m.has_global:
            glob = ["—"] * 3
        if m.pooled:
            pers = ["—"] * (len(GROUPS) + 2)
        else:
            pers = [fmt(list(m.final("personalized", "rsum", g).values())) for g in (None, *GROUPS)]
            pers.append(fmt(list(m.final("personalized", "rsum", "worst10").values())))
        lines.append(f"| {m.label} | {len(m.seeds)} | " + " | ".join(glob + pers) + " |")
    return [*lines, ""]


def _comparison_table(rows: list[MethodCells], reference: str) -> list[str]:
    ref = next((m for m in rows if m.name == reference), None)
    if ref is None:
        return []
    lines = [
        f"{ref.label} minus each method, paired by seed: mean difference "
        "[95% t interval], paired t-test p (positive: "
        f"{ref.label} is higher).",
        "",
        "| method | Δ global rsum | Δ personalised rsum (all clients) |",
        "|---|---|---|",
    ]
    for m in rows:
        if m is ref:
            continue
        glob = (
            paired(ref.final("global"), m.final("global"))
            if m.has_global and ref.has_global
            else "—"
        )
        pers = "—" if m.pooled else paired(ref.final("personalized"), m.final("personalized"))
        lines.append(f"| {m.label} | {glob} | {pers} |")
    return [*lines, ""]


def _chosen_comparisons_table(
    rows: list[MethodCells], pairs: Sequence[tuple[str, str]]
) -> list[str]:
    """The suite's ``comparisons``: each method against the baseline that has the same
    tools (e.g. personal adapters), on global rsum and each personalised group."""
    by_name = {m.name: m for m in rows}
    present = [(by_name[a], by_name[b]) for a, b in pairs if a in by_name and b in by_name]
    if not present:
        return []
    lines = [
        "Chosen comparisons (the suite's `comparisons`), first minus second, paired by seed: "
        "mean difference [95% t interval], paired t-test p.",
        "",
        "| comparison | Δ global rsum | Δ pers. all | Δ pers. paired | Δ pers. image-only "
        "| Δ pers. text-only |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in present:
        glob = (
            paired(a.final("global"), b.final("global")) if a.has_global and b.has_global else "—"
        )
        pers = [
            "—"
            if a.pooled or b.pooled
            else paired(a.final("personalized", "rsum", g), b.final("personalized", "rsum", g))
            for g in (None, *GROUPS)
        ]
        lines.append(f"| {a.label} − {b.label} | {glob} | {' | '.join(pers)} |")
    return [*lines, ""]


def unimodal_share(run: RunRecord) -> dict[str, float] | None:
    """Mean over the aggregating rounds of the unimodal clients' share of the participants
    (``participants``) and of each recorded weight (``router``, ``minimax``, ``fused``);
    None when the run recorded no weights or had no unimodal participant."""
    modality = run.modality()
    rounds = [r["weights"] for r in run.rows if r.get("weights")]
    if not rounds:
        return None
    sums = dict.fromkeys(("participants", *WEIGHT_KINDS), 0.0)
    for weights in rounds:
        unimodal = [c for c in weights if modality.get(int(c), "paired") != "paired"]
        sums["participants"] += len(unimodal) / len(weights)
        for kind in WEIGHT_KINDS:
            total = sum(w[kind] for w in weights.values())
            sums[kind] += sum(weights[c][kind] for c in unimodal) / total if total else 0.0
    if not sums["participants"]:
        return None
    return {k: v / len(rounds) for k, v in sums.items()}


def _unimodal_weight_table(rows: list[MethodCells]) -> list[str]:
    """How much of each aggregation went to the clients that miss a modality: the router
    is meant to move weight off clients whose updates pull the shared space apart."""
    lines = []
    for m in rows:
        shares = [s for run in m.runs.values() if (s := unimodal_share(run)) is not None]
        if shares:
            cells = [fmt([100 * s[k] for s in shares]) for k in ("participants", *WEIGHT_KINDS)]
            lines.append(f"| {m.label} | {len(shares)} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "Unimodal clients' share of each round's aggregation in %, mean over the rounds, "
        "then mean ± std over seeds: of the participants, and of the router, minimax and "
        "fused weights. Without the router the *router* column records the sample-count weights "
        "the fusion uses instead; FedAvg's weights are sample counts throughout.",
        "",
        "| method | seeds | % of participants | % of router weight | % of minimax weight "
        "| % of fused weight |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
    ]


# which tower each group's update alignment is read on: a unimodal client's own tower
ALIGNMENT_TOWERS = {"paired": ("vision", "text"), "image-only": ("vision",), "text-only": ("text",)}


def update_alignment(run: RunRecord) -> dict[str, dict[str, float]] | None:
    """Per modality group, the mean over the rounds and its clients' towers of where their
    updates pointed (the run's per-round ``updates`` record): ``cos_paired``, the cosine
    with the other paired clients' mean update, and ``norm``. None when not recorded."""
    modality = run.modality()
    values: dict[str, dict[str, list[float]]] = {}
    for row in run.rows:
        for client, towers in (row.get("updates") or {}).items():
            group = modality.get(int(client), "paired")
            for tower in ALIGNMENT_TOWERS.get(group, ()):
                stats = towers.get(tower, {})
                for key in ("cos_paired", "norm"):
                    if key in stats:
                        values.setdefault(group, {}).setdefault(key, []).append(stats[key])
    if not values:
        return None
    return {g: {k: sum(v) / len(v) for k, v in kv.items()} for g, kv in values.items()}


def _update_alignment_table(rows: list[MethodCells]) -> list[str]:
    """Whether the unimodal clients' updates point where the paired clients' go: the
    question behind anchoring and routing, read from the updates themselves."""
    lines = []
    for m in rows:
        runs = [a for run in m.runs.values() if (a := update_alignment(run)) is not None]
        if not any(g in a for a in runs for g in ("image-only", "text-only")):
            continue
        cells = []
        for group in GROUPS:
            for key in ("cos_paired", "norm"):
                got = [a[group][key] for a in runs if key in a.get(group, {})]
                cells.append(fmt(got, 3) if got else "—")
        lines.append(f"| {m.label} | {len(runs)} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "Where the updates pointed, mean over rounds and clients, then mean ± std over "
        "seeds: each client's update on the towers it holds (a unimodal client's own tower), "
        "its cosine with the mean update of the round's *other* paired clients, and its "
        "norm. Cosines near 0 are updates the paired clients do not share.",
        "",
        "| method | seeds | paired: cos | paired: norm | image-only: cos | image-only: norm "
        "| text-only: cos | text-only: norm |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def _figures(
    suite: Suite, data: dict[str, list[MethodCells]], out_dir: Path, colours, footer: str
) -> list[tuple[Path, str]]:
    figures = []
    panels = []
    for setting in suite.settings:
        lines = {
            m.label: [r.curve("global") for _, r in sorted(m.runs.items())]
            for m in data[setting.name]
            if m.has_global
        }
        if lines:
            panels.append((setting.label, lines))
    if panels:
        path = plot_curves(
            panels,
            out_dir / "curves.png",
            footer,
            colours=colours,
            title="global rsum per round: mean over seeds, band = min–max "
            "(local-only has no global model and is not drawn)",
        )
        figures.append((path, "Global rsum per round, one panel per setting"))

    bars = []
    for setting in suite.settings:
        rows = [m for m in data[setting.name] if not m.pooled]
        by_method = {}
        for m in rows:
            groups = {g: list(m.final("personalized", "rsum", g).values()) for g in GROUPS}
            groups["worst 10%"] = list(m.final("personalized", "rsum", "worst10").values())
            by_method[m.label] = {g: v for g, v in groups.items() if v}
        unimodal = any(g in v for v in by_method.values() for g in ("image-only", "text-only"))
        if unimodal:
            bars.append((setting.label, by_method))
    if bars:
        path = plot_group_bars(
            bars,
            out_dir / "personalised.png",
            footer,
            colours=colours,
            title="personalised rsum at the last round by modality group (mean over the "
            "group's clients): bar = mean over seeds, whisker = std",
        )
        figures.append(
            (path, "Personalised rsum per modality group, settings with missing modalities")
        )

    run = _weights_run(suite, data)
    if run is not None:
        setting, seed, record = run
        title = f"{suite.reference} · {setting} · seed {seed}"
        what = f"suite {suite.name} · {setting}/{suite.reference}/seed-{seed}"
        heat = plot_weight_heatmap(
            record,
            out_dir / "weights-heatmap.png",
            f"fused weights (router × minimax): {title}",
            what,
        )
        scatter = plot_weights_by_client(
            record,
            out_dir / "weights-by-client.png",
            f"weights by modality and size: {title}",
            what,
        )
        if heat is not None:
            figures.append((heat, f"Aggregation weights per client and round ({title})"))
        if scatter is not None:
            figures.append((scatter, f"Weights against client modality and size ({title})"))
    return figures


def _weights_run(
    suite: Suite, data: dict[str, list[MethodCells]]
) -> tuple[str, int, RunRecord] | None:
    """The reference method's run whose weights to draw: the last setting with
    missing-modality clients (else the last setting), lowest seed."""
    candidates = []
    for setting in suite.settings:
        for m in data[setting.name]:
            if m.name == suite.reference and m.runs:
                seed = min(m.runs)
                run = m.runs[seed]
                unimodal = any(c.get("modality") != "paired" for c in run.clients)
                candidates.append((unimodal, setting.name, seed, run))
    if not candidates:
        return None
    best = max(candidates, key=lambda c: (c[0], [s.name for s in suite.settings].index(c[1])))
    return best[1], best[2], best[3]
