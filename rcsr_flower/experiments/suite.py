"""A suite: settings × methods × seeds, read from a small TOML file under ``experiments/``.

::

    description = "what the suite is for"
    seeds = [0, 1, 2]
    reference = "rcsr"           # the method the report compares the others with
    num-supernodes = 10          # SuperNodes per cell (a method may change it)
    timeout = 3600               # seconds one cell may take

    [config]                     # run-config overrides for every cell
    num-server-rounds = 8

    [settings.S4]
    label = "S4: non-IID (alpha 0.1), 50% missing"
    config = { partitioning = "dirichlet", alpha = 0.1, missing-rate = 0.5 }

    [methods.fedavg]
    label = "FedAvg"
    config = { strategy = "fedavg" }

    [methods.rcsr-no-router]
    label = "RCSR − router"
    settings = ["S4"]            # only these settings' cells (ablations on the headline)
    config = { strategy = "rcsr", router = false }

    [methods.centralised]
    label = "centralised (pooled data, 1 node)"
    pooled = true                # one cell per seed, shown in every setting's table
    num-supernodes = 1
    config = { partitioning = "iid", missing-rate = 0.0, ... }

A cell's run config is the suite's ``config``, then its setting's, then its method's
(later wins), then ``seed``, ``run-name`` and ``output-dir``. A method with ``settings``
has cells in those settings only (the report shows "—" elsewhere and its note says why:
an ablation run where it is judged, a variant that equals another where no client
misses a modality). A ``pooled`` method gets
no setting's config: its cell lives under the setting name ``pooled``. Everything is
checked against the one run-config schema (``rcsr_flower.config``) before any cell
runs: a key the config does not know stops the suite with one line naming it.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLED = "pooled"  # the setting name of a pooled method's cells
SUITE_KEYS = {
    "description",
    "seeds",
    "num-supernodes",
    "timeout",
    "reference",
    "comparisons",
    "config",
    "settings",
    "methods",
}
SETTING_KEYS = {"label", "config"}
METHOD_KEYS = {"label", "config", "pooled", "num-supernodes", "note", "settings"}
# set by the runner for each cell; a suite may not set them
RESERVED = {"seed", "run-name", "output-dir", "resume-from"}


class SuiteError(ValueError):
    """A suite file is malformed or names a run-config key or value the config rejects."""


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    config: dict[str, Any]
    pooled: bool = False
    num_supernodes: int | None = None
    note: str = ""
    settings: tuple[str, ...] | None = None  # None: every setting

    def runs_in(self, setting: str) -> bool:
        """Whether the method has cells in ``setting`` (a pooled method: in none)."""
        return not self.pooled and (self.settings is None or setting in self.settings)


@dataclass(frozen=True)
class Cell:
    """One ``flwr run``: a setting, a method and a seed."""

    setting: str
    method: str
    seed: int
    overrides: dict[str, Any]  # run config without run-name/output-dir
    num_supernodes: int

    @property
    def id(self) -> str:
        return f"{self.setting}/{self.method}/seed-{self.seed}"

    def directory(self, root: Path) -> Path:
        """``<root>/<setting>/<method>/seed-<k>``: the run's output directory."""
        return root / self.setting / self.method / f"seed-{self.seed}"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    seeds: tuple[int, ...]
    num_supernodes: int
    timeout: float
    reference: str  # the method the report compares every other method with
    config: dict[str, Any]
    settings: tuple[Setting, ...]
    methods: tuple[Method, ...]
    # further pairs (a, b) the report compares as a − b: a method against its fair baseline
    comparisons: tuple[tuple[str, str], ...] = ()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path) -> Suite:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SuiteError(f"{path}: {exc}") from None
        where = str(path)
        _known(raw, SUITE_KEYS, where)
        settings = tuple(
            Setting(name, str(s.get("label", name)), _config(s, f"{where} [settings.{name}]"))
            for name, s in _tables(raw, "settings", SETTING_KEYS, where).items()
        )
        methods = tuple(
            Method(
                name,
                str(m.get("label", name)),
                _config(m, f"{where} [methods.{name}]"),
                bool(m.get("pooled", False)),
                int(m["num-supernodes"]) if "num-supernodes" in m else None,
                str(m.get("note", "")),
                _method_settings(m, {s.name for s in settings}, f"{where} [methods.{name}]"),
            )
            for name, m in _tables(raw, "methods", METHOD_KEYS, where).items()
        )
        if not settings or not methods:
            raise SuiteError(f"{where}: needs at least one [settings.X] and one [methods.Y]")
        if any(s.name == POOLED for s in settings):
            raise SuiteError(f"{where}: '{POOLED}' is reserved for pooled methods' cells")
        seeds = raw.get("seeds", [0])
        if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise SuiteError(f"{where}: 'seeds' must be a list of integers >= 0, got {seeds!r}")
        reference = str(raw.get("reference", "rcsr"))
        if "reference" in raw and reference not in {m.name for m in methods}:
            raise SuiteError(f"{where}: 'reference' = {reference!r} names no [methods.X]")
        comparisons = raw.get("comparisons", [])
        names = {m.name for m in methods}
        if not isinstance(comparisons, list) or not all(
            isinstance(c, list) and len(c) == 2 and set(c) <= names and c[0] != c[1]
            for c in comparisons
        ):
            raise SuiteError(
                f"{where}: 'comparisons' = {comparisons!r}: a list of [method, baseline] "
                'pairs of two different [methods.X] names, e.g. [["rcsr", "fedavg"]]'
            )
        return cls(
            name=path.stem,
            path=path,
            description=str(raw.get("description", "")),
            seeds=tuple(seeds),
            num_supernodes=int(raw.get("num-supernodes", 10)),
            timeout=float(raw.get("timeout", 3600)),
            reference=reference,
            config=_config(raw, where),
            settings=settings,
            methods=methods,
            comparisons=tuple((str(a), str(b)) for a, b in comparisons),
        )

    @classmethod
    def find(cls, name: str, root: Path) -> Suite:
        """``name``: a suite name under ``root/experiments/`` or a path to a TOML file."""
        candidate = Path(name)
        if candidate.suffix == ".toml" and candidate.is_file():
            return cls.load(candidate)
        path = root / "experiments" / f"{name}.toml"
        if not path.is_file():
            have = sorted(p.stem for p in (root / "experiments").glob("*.toml"))
            raise SuiteError(f"no suite '{name}' ({path}); suites: {', '.join(have) or 'none'}")
        return cls.load(path)

    # ------------------------------------------------------------------ cells
    def setting(self, name: str) -> Setting | None:
        return next((s for s in self.settings if s.name == name), None)

    def method(self, name: str) -> Method | None:
        return next((m for m in self.methods if m.name == name), None)

    def cells(self, seeds: list[int] | None = None, only: str | None = None) -> list[Cell]:
        """Every cell, setting by setting (pooled methods last), method by method,
        seed by seed; ``only`` keeps the cells whose id (``S4/rcsr/seed-0``) matches it:
        a shell pattern, or a plain substring when it has no ``*?[``."""
        seeds = list(self.seeds if seeds is None else seeds)
        out = []
        for setting in (*self.settings, None):
            for method in self.methods:
                if not (method.pooled if setting is None else method.runs_in(setting.name)):
                    continue
                for seed in seeds:
                    overrides = {
                        **self.config,
                        **(setting.config if setting is not None else {}),
                        **method.config,
                        "seed": seed,
                    }
                    out.append(
                        Cell(
                            setting.name if setting is not None else POOLED,
                            method.name,
                            seed,
                            overrides,
                            method.num_supernodes or self.num_supernodes,
                        )
                    )
        if only:
            pattern = only if any(c in only for c in "*?[") else f"*{only}*"
            out = [c for c in out if fnmatch.fnmatchcase(c.id, pattern)]
        return out

    def check(self, app_dir: Path, cells: list[Cell]) -> None:
        """Validate every cell's run config with the app's schema and defaults, and its
        minimums against its federation's size; raise :class:`SuiteError` (one line)."""
        from rcsr_flower.runtime.launch import check_run_config

        for cell in cells:
            try:
                cfg = check_run_config(app_dir, [], dict(cell.overrides))
                cfg.check_federation(cell.num_supernodes)
            except Exception as exc:  # ConfigError: one line naming the key
                source = (
                    f"[methods.{cell.method}]"
                    if cell.setting == POOLED
                    else f"[settings.{cell.setting}] + [methods.{cell.method}]"
                )
                raise SuiteError(f"{self.path} {source}: {exc}") from None


def _known(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SuiteError(
            f"{where}: unknown suite key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))} "
            "(run-config keys go in a 'config' table)"
        )


def _tables(raw: dict, key: str, allowed: set[str], where: str) -> dict[str, dict]:
    tables = raw.get(key, {})
    if not isinstance(tables, dict):
        raise SuiteError(f"{where}: '{key}' must be a table of tables")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise SuiteError(f"{where}: [{key}.{name}] must be a table")
        if "/" in name or name.startswith("."):
            raise SuiteError(f"{where}: [{key}.{name}]: a name may not contain '/'")
        _known(table, allowed, f"{where} [{key}.{name}]")
    return tables


def _method_settings(table: dict, known: set[str], where: str) -> tuple[str, ...] | None:
    if "settings" not in table:
        return None
    names = table["settings"]
    if table.get("pooled", False):
        raise SuiteError(f"{where}: a pooled method has no settings; drop 'settings'")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SuiteError(f"{where}: 'settings' must be a list of setting names, got {names!r}")
    unknown = sorted(set(names) - known)
    if unknown:
        have = ", ".join(sorted(known))
        raise SuiteError(f"{where}: 'settings' names no [settings.{unknown[0]}]; have: {have}")
    return tuple(names)


def _config(table: dict, where: str) -> dict[str, Any]:
    config = table.get("config", {})
    if not isinstance(config, dict):
        raise SuiteError(f"{where}: 'config' must be a table of run-config keys")
    reserved = sorted(set(config) & RESERVED)
    if reserved:
        raise SuiteError(
            f"{where}: run-config key '{reserved[0]}' is set by the runner for each cell"
        )
    return dict(config)
