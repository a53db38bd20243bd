"""Figures of runs: retrieval curves, personalised bars, the router's weights.

``python -m rcsr_flower.experiments.plot outputs/<run>`` draws one run's figures into
``outputs/<run>/plots/``; ``python -m rcsr_flower.experiments report`` draws a suite's
with the same functions. Everything is read from what a run leaves on disk
(``metrics.jsonl``, ``config.json``, ``partition.json`` or ``clients.json``,
``provenance.json``); matplotlib runs headless (Agg). Every figure carries a footer with
the backbone, the evaluation protocol, the machine and the commit it came from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GROUPS = ("paired", "image-only", "text-only")
GROUP_COLOURS = {"paired": "#4c72b0", "image-only": "#dd8452", "text-only": "#55a868"}
WEIGHT_KINDS = ("router", "minimax", "fused")

Series = Sequence[tuple[int, float]]  # (round, value)


# ============================================================================ reading
@dataclass
class RunRecord:
    """What one run left on disk, read back."""

    path: Path
    rows: list[dict]
    config: dict
    result: dict
    clients: list[dict]  # client_id, modality, num_train, num_test
    provenance: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{path} has no metrics.jsonl: not a run's output directory")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return cls(
            path=path,
            rows=rows,
            config=_json(path / "config.json") or {},
            result=_json(path / "result.json") or {},
            clients=read_clients(path),
            provenance=_json(path / "provenance.json") or {},
        )

    @property
    def strategy(self) -> str:
        return str(self.config.get("strategy", ""))

    @property
    def has_global_model(self) -> bool:
        """False for local-only: its server adapters never change (zero-shot)."""
        return self.strategy != "local"

    def last(self, key: str) -> dict | None:
        """The last round's ``key`` record (``global``, ``personalized``)."""
        return next((r[key] for r in reversed(self.rows) if r.get(key)), None)

    def at(self, server_round: int, key: str) -> dict | None:
        return next((r.get(key) for r in self.rows if r["round"] == server_round), None)

    def curve(self, key: str = "global", metric: str = "rsum", group: str | None = None) -> Series:
        """``[(round, value)]`` of ``key`` (``global``/``personalized``) over the rounds;
        ``group``: a modality group of the personalised record (else its mean)."""
        out = []
        for row in self.rows:
            record = row.get(key)
            if not record:
                continue
            if key == "personalized":
                record = (record.get("by_group", {}).get(group) if group else record) or {}
                record = record.get("mean", {})
            if metric in record:
                out.append((int(row["round"]), float(record[metric])))
        return out

    def modality(self) -> dict[int, str]:
        return {int(c["client_id"]): c["modality"] for c in self.clients}

    def weights(self, kind: str = "fused") -> tuple[list[int], list[int], np.ndarray]:
        """``(client ids, rounds, W)``: ``W[i, j]`` the ``kind`` weight of client ``i`` in
        round ``j``, NaN where it did not take part."""
        rows = [r for r in self.rows if r.get("weights")]
        clients = sorted(
            {int(c) for r in rows for c in r["weights"]} | set(self.modality()),
            key=lambda c: (_group_order(self.modality().get(c)), c),
        )
        rounds = [int(r["round"]) for r in rows]
        w = np.full((len(clients), len(rounds)), np.nan)
        index = {c: i for i, c in enumerate(clients)}
        for j, r in enumerate(rows):
            for c, ws in r["weights"].items():
                w[index[int(c)], j] = ws[kind]
        return clients, rounds, w

    def footer(self, what: str = "") -> str:
        return footer_line(
            [self.config], [self.provenance] if self.provenance else [], what or self.path.name
        )


def read_clients(path: Path) -> list[dict]:
    """``clients.json`` (a suite's archive) or ``partition.json`` (a run) without the
    index lists: id, modality and sizes of every client."""
    for name in ("clients.json", "partition.json"):
        data = _json(path / name)
        if data is not None:
            clients = data["clients"] if isinstance(data, dict) else data
            keep = ("client_id", "modality", "num_train", "num_test")
            return [{k: c[k] for k in keep if k in c} for c in clients]
    return []


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _group_order(modality: str | None) -> int:
    return GROUPS.index(modality) if modality in GROUPS else len(GROUPS)


def backbone_name(config: Mapping) -> str:
    model = str(config.get("model-name", "?"))
    if model == "embedded":
        return "embedded tiny CLIP (pretrained here)"
    return Path(model).name if "/" in model and Path(model).is_absolute() else model


def footer_line(configs: Sequence[Mapping], provenances: Sequence[Mapping], what: str) -> str:
    """``backbone · data · protocol · machine · commit`` of the runs a figure shows (every
    distinct value, so a figure mixing commits or machines says so)."""

    def distinct(values) -> str:
        values = sorted({str(v) for v in values if v is not None})
        return " + ".join(values) if values else "not recorded"

    data = distinct(
        "embedded synthetic corpus" if c.get("dataset") == "embedded" else Path(c["dataset"]).name
        for c in configs
        if "dataset" in c
    )
    return (
        f"{what} · backbone: {distinct(backbone_name(c) for c in configs)} · data: {data} · "
        f"protocol: {distinct(c.get('eval-protocol') for c in configs)}\n"
        f"machine: {distinct(p.get('machine') for p in provenances)} · "
        f"commit: {distinct(p.get('commit') for p in provenances)} · "
        f"load: {load_range(provenances)}"
    )


def load_range(provenances: Sequence[Mapping]) -> str:
    """The 1-minute load averages at the runs' starts and ends, lowest to highest, and
    how many runs recorded one (older runs did not): what the machine was also doing."""
    values = [
        float(v)
        for p in provenances
        if isinstance(p.get("load_avg_1m"), Mapping)
        for v in p["load_avg_1m"].values()
        if isinstance(v, int | float)
    ]
    recorded = sum(isinstance(p.get("load_avg_1m"), Mapping) for p in provenances)
    if not values:
        return "not recorded"
    span = (
        f"{min(values):.1f}"
        if min(values) == max(values)
        else f"{min(values):.1f}–{max(values):.1f}"
    )
    return (
        span if recorded == len(provenances) else f"{span} ({recorded} of {len(provenances)} runs)"
    )


# ============================================================================ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, footer: str) -> Path:
    fig.text(0.01, 0.005, footer, fontsize=7, color="#555555", va="bottom", ha="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    # no timestamp in the file: the same inputs give the same bytes
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def colour_map(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per label, stable in the label order (tab10, tab20's light ones, then
    Dark2: 28 before a colour repeats, which a suite of 22 methods needs)."""
    plt = _pyplot()
    palette = [
        *plt.get_cmap("tab10").colors,
        *plt.get_cmap("tab20").colors[1::2],
        *plt.get_cmap("Dark2").colors,
    ]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


LEGEND_WIDTH = 3.3  # inches at the right of a figure with a legend
FOOTER_HEIGHT = 0.45  # inches at the bottom for the provenance footer
PANEL_TITLE_CHARS = 75  # a curves panel's title wraps here (fontsize 9 over 5 inches)


def _layout(fig, handles, names, title: str, below: float = 0.5, above: float = 0.0) -> None:
    """Title on top, legend at the right, footer room at the bottom (sizes in inches, so
    a figure with many methods or panels keeps its proportions); ``above``: inches more
    under the title, for top panels whose titles wrap."""
    width, height = fig.get_size_inches()
    if title:
        title = textwrap.fill(title, int(width * 9))
        fig.suptitle(title, x=0.75 / width, y=1 - 0.1 / height, ha="left", va="top", fontsize=10)
    if handles:
        fig.legend(
            handles,
            names,
            loc="center left",
            bbox_to_anchor=(1 - (LEGEND_WIDTH - 0.15) / width, 0.5),
            fontsize=8,
            frameon=False,
        )
    fig.subplots_adjust(
        left=0.75 / width,
        right=1 - LEGEND_WIDTH / width,
        top=1 - ((0.55 + 0.2 * title.count("\n") if title else 0.35) + above) / height,
        bottom=(FOOTER_HEIGHT + below) / height,
        hspace=0.5,
        wspace=0.22,
    )


def _legend_entries(axes) -> tuple[list, list[str]]:
    handles, names = [], []
    for ax in axes:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    return handles, names


def plot_curves(
    panels: Sequence[tuple[str, Mapping[str, Sequence[Series]]]],
    path: Path,
    footer: str,
    ylabel: str = "global rsum",
    colours: Mapping[str, tuple] | None = None,
    title: str = "",
) -> Path:
    """One panel per ``(title, {label: [series per seed]})``: the mean over seeds as a
    line, the seeds' min–max as a shaded band (none for a single seed)."""
    plt = _pyplot()
    labels = list(dict.fromkeys(label for _, lines in panels for label in lines))
    colours = colours or colour_map(labels)
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.0 * cols + LEGEND_WIDTH + 0.8, 3.3 * rows + 1.6), squeeze=False
    )
    for ax, (panel_title, lines) in zip(axes.flat, panels, strict=False):
        for label, seeds in lines.items():
            rounds = sorted({r for s in seeds for r, _ in s})
            if not rounds:
                continue
            table = np.array([[dict(s).get(r, np.nan) for r in rounds] for s in seeds], dtype=float)
            mean = np.nanmean(table, axis=0)
            ax.plot(rounds, mean, marker="o", ms=3, lw=1.6, color=colours[label], label=label)
            if len(seeds) > 1:
                lo, hi = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
                ax.fill_between(rounds, lo, hi, color=colours[label], alpha=0.15, lw=0)
        # wrapped to the panel's width, so a long title runs into neither panel nor legend
        ax.set_title(textwrap.fill(panel_title, PANEL_TITLE_CHARS), fontsize=9)
        ax.set_xlabel("round (0 = zero-shot)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    top_lines = max(len(textwrap.wrap(t, PANEL_TITLE_CHARS)) for t, _ in panels[:cols])
    handles = _legend_entries(list(axes.flat)[: len(panels)])
    _layout(fig, *handles, title, above=0.15 * (top_lines - 1))
    return _save(fig, path, footer)


def plot_group_bars(
    panels: Sequence[tuple[str, Mapping[str, Mapping[str, Sequence[float]]]]],
    path: Path,
    footer: str,
    colours: Mapping[str, tuple] | None = None,
    ylabel: str = "personalised rsum",
    title: str = "",
) -> Path:
    """One panel per ``(title, {label: {group: [value per seed]}})``: bars by modality
    group, one per label, at the seeds' mean with their standard deviation."""
    plt = _pyplot()
    labels = list(dict.fromkeys(label for _, bars in panels for label in bars))
    colours = colours or colour_map(labels)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(6.0, 0.13 * len(labels) * 5) + LEGEND_WIDTH + 0.8, 3.0 * len(panels) + 1.6),
        squeeze=False,
    )
    axes = axes[:, 0]
    for ax, (panel_title, bars) in zip(axes, panels, strict=True):
        groups = [g for g in (*GROUPS, "worst 10%") if any(g in v for v in bars.values())]
        width = 0.8 / max(len(bars), 1)
        for i, (label, by_group) in enumerate(bars.items()):
            xs, means, errs = [], [], []
            for j, g in enumerate(groups):
                values = by_group.get(g)
                if not values:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(float(np.mean(values)))
                errs.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
            ax.bar(xs, means, width, yerr=errs, capsize=2, color=colours[label], label=label)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(panel_title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        values = [v for b in bars.values() for vs in b.values() for v in vs]
        if values:
            ax.set_ylim(max(0.0, min(values) - 0.15 * (max(values) - min(values) + 10)), None)
    _layout(fig, *_legend_entries(axes), title)
    return _save(fig, path, footer)


def _client_labels(run: RunRecord, clients: Sequence[int]) -> list[str]:
    modality = run.modality()
    sizes = {int(c["client_id"]): c.get("num_train") for c in run.clients}
    return [f"client {c} · {modality.get(c, '?')} · n={sizes.get(c, '?')}" for c in clients]


def plot_weight_heatmap(run: RunRecord, path: Path, title: str = "", what: str = "") -> Path | None:
    """Clients × rounds of the fused aggregation weight (blank: not sampled that round),
    clients grouped and labelled by modality; None when the run aggregated nothing."""
    plt = _pyplot()
    clients, rounds, w = run.weights("fused")
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(rounds) + 4.2), 0.36 * len(clients) + 2.4))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    image = ax.imshow(  # from 0, so that near-equal weights look near-equal
        np.ma.masked_invalid(w),
        aspect="auto",
        cmap=cmap,
        interpolation="nearest",
        vmin=0.0,
        vmax=float(np.nanmax(w)),
    )
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    ax.set_yticks(range(len(clients)), _client_labels(run, clients), fontsize=8)
    modality = run.modality()
    for tick, c in zip(ax.get_yticklabels(), clients, strict=True):
        tick.set_color(GROUP_COLOURS.get(modality.get(c), "black"))
    middle = 0.6 * np.nanmax(w)
    for i in range(len(clients)):
        for j in range(len(rounds)):
            if not np.isnan(w[i, j]):
                colour = "black" if w[i, j] > middle else "white"
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour)
    ax.set_xlabel("round")
    fig.colorbar(image, ax=ax, label="fused weight (grey: not sampled)")
    kind = (
        "router × minimax"
        if run.strategy == "rcsr"
        else "sample-count weights" + (" (FedAvg)" if run.strategy else "")
    )
    ax.set_title(title or f"aggregation weight per client and round: {kind}", fontsize=10)
    fig.subplots_adjust(bottom=(FOOTER_HEIGHT + 0.5) / fig.get_figheight(), left=0.3)
    return _save(fig, path, run.footer(what))


def plot_weights_by_client(
    run: RunRecord, path: Path, title: str = "", what: str = ""
) -> Path | None:
    """Router, minimax and fused weight (every client-round) against the client's
    training-set size, coloured by modality; the dashed line is uniform (1/participants)."""
    plt = _pyplot()
    clients, rounds, _ = run.weights("fused")
    if not rounds or not run.clients:  # no partition.json/clients.json: no sizes to plot
        return None
    modality = run.modality()
    sizes = {int(c["client_id"]): c.get("num_train", 0) for c in run.clients}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, kind in zip(axes, WEIGHT_KINDS, strict=True):
        _, _, w = run.weights(kind)
        participants = np.sum(~np.isnan(w), axis=0)
        for g in GROUPS:
            idx = [i for i, c in enumerate(clients) if modality.get(c) == g]
            xs = [sizes.get(clients[i], 0) for i in idx for j in range(len(rounds))]
            ys = [w[i, j] * participants[j] for i in idx for j in range(len(rounds))]
            keep = [k for k, y in enumerate(ys) if not np.isnan(y)]
            if keep:
                ax.scatter(
                    [xs[k] for k in keep],
                    [ys[k] for k in keep],
                    s=18,
                    alpha=0.75,
                    color=GROUP_COLOURS[g],
                    label=g,
                )
        ax.axhline(1.0, ls="--", lw=1, color="grey")
        ax.set_title(f"{kind} weight", fontsize=10)
        ax.set_xlabel("client training examples")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("weight × participants (1 = uniform)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "aggregation weights by client modality and size", fontsize=11)
    fig.subplots_adjust(
        bottom=(FOOTER_HEIGHT + 0.55) / fig.get_figheight(),
        top=0.85,
        left=0.06,
        right=0.98,
        wspace=0.08,
    )
    return _save(fig, path, run.footer(what))


# ============================================================================ tables
def run_table(run: RunRecord) -> str:
    """One run's metrics per round as a markdown table: global rsum and R@1 both ways,
    personalised rsum over all clients, per modality group and of the worst 10%."""
    groups = [g for g in GROUPS if run.curve("personalized", group=g)]
    head = ["round", "global rsum", "i2t R@1", "t2i R@1", "pers. all"]
    head += [f"pers. {g}" for g in groups] + ["pers. worst 10%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(record: dict | None, metric: str = "rsum") -> str:
        return f"{record[metric]:.1f}" if record and metric in record else "—"

    for row in run.rows:
        glob = row.get("global") if run.has_global_model else None
        pers = row.get("personalized") or {}
        by_group = pers.get("by_group", {})
        cells = [str(row["round"]), *(num(glob, m) for m in ("rsum", "i2t_r1", "t2i_r1"))]
        cells.append(num(pers.get("mean")))
        cells += [num(by_group.get(g, {}).get("mean")) for g in groups]
        cells.append(num(pers.get("worst10")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MARK = "<!-- results:{key}:{end} -->"


def update_marked_block(path: Path, key: str, block: str) -> bool:
    """Replace the text between ``<!-- results:KEY:start -->`` and ``...:end -->`` in
    ``path`` (a README) with ``block``, so tables there are written by code, not typed.
    True if the file changed."""
    start, end = MARK.format(key=key, end="start"), MARK.format(key=key, end="end")
    text = path.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(
            f"{path} needs exactly one '{start}' line followed by one '{end}' line where "
            "the table goes; add them, or leave out --readme"
        )
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    new = f"{before}{start}\n{block}{end}{after}"
    if new != text:
        path.write_text(new)
    return new != text


# ============================================================================ one run
def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """The figures of one run: global and personalised rsum per round, and (when it
    aggregated) the weight heatmap and weights by client. Returns the files written."""
    run = RunRecord.load(run_dir)
    out_dir = out_dir or run_dir / "plots"
    # a suite's cell is <setting>/<method>/seed-<k>: name it by all three
    parts = run_dir.resolve().parts
    name = "/".join(parts[-3:]) if run_dir.name.startswith("seed-") else run_dir.name
    series = {}
    if run.has_global_model:
        series["global test split"] = [run.curve("global")]
    series["personalised: all clients"] = [run.curve("personalized")]
    groups = {g: curve for g in GROUPS if (curve := run.curve("personalized", group=g))}
    if len(groups) > 1:  # one group is all clients: its line would hide under theirs
        series.update({f"personalised: {g}": [curve] for g, curve in groups.items()})
    panels = [(f"{name} ({run.strategy or '?'})", series)]
    colours = colour_map(list(series))
    note = "" if run.has_global_model else " (local-only: no global model, personalised only)"
    written = [
        plot_curves(
            panels,
            out_dir / "curves.png",
            run.footer(name),
            ylabel="rsum",
            colours=colours,
            title=f"retrieval rsum per round{note}",
        )
    ]
    for draw, file in (
        (plot_weight_heatmap, "weights-heatmap.png"),
        (plot_weights_by_client, "weights-by-client.png"),
    ):
        if (path := draw(run, out_dir / file, what=name)) is not None:
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rcsr_flower.experiments.plot", description=__doc__
    )
    parser.add_argument("run_dir", help="a run's output directory, e.g. outputs/<run-name>")
    parser.add_argument("--out", default=None, help="default: <run_dir>/plots")
    parser.add_argument(
        "--readme",
        default=None,
        help="also write the run's per-round table between the <!-- results:RUN:start/end "
        "--> markers of this file (RUN: the run directory's name)",
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        written = plot_run(run_dir, Path(args.out) if args.out else None)
        if args.readme:
            command = " ".join(["python -m rcsr_flower.experiments.plot", *(argv or sys.argv[1:])])
            block = (
                f"Generated by `{command}` from the run's `metrics.jsonl`; do not edit by "
                f"hand.\n\n{run_table(RunRecord.load(run_dir))}"
            )
            changed = update_marked_block(Path(args.readme), run_dir.resolve().name, block)
            print(f"{'updated' if changed else 'unchanged'}: the table in {args.readme}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
