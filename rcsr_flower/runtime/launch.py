"""Run the app in a local Flower simulation and report success by exit code.

``flwr run .`` alone has two traps (docs/development.md): it exits 0 even when the run
failed, and its auto-started local SuperLink stays alive, is silently reused (also by
other checkouts) and installs the app's dependencies from the network unless told not
to. This launcher, used by ``make run`` and the tests, avoids both:

1. starts its own ``flower-superlink --simulation`` on free loopback ports with its own
   ``FLWR_HOME`` and runtime dependency installation disabled;
2. validates the run config and builds what the run would otherwise wait for in silence
   (embedded assets, the semantic partition: :func:`prepare_run`) — for this app; another
   app (``--app-dir``, e.g. ``examples/label-routing``) gets its ``-c`` keys checked
   against its own ``[tool.flwr.app.config]`` and passed on as written;
3. submits the app with ``flwr run . <connection> --stream`` and a known run name;
4. reads ``<output-dir>/<run-name>/result.json`` (written last by the ServerApp: this
   app's, or any app's that runs through ``rcsr_flower.routing.runner``) and exits non-zero
   unless it says ``completed``;
5. always stops the SuperLink and everything it spawned (by process group, and by a
   tag in their environment for what left the group), on SIGTERM and SIGINT too
   (``rcsr_flower.runtime.processes``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rcsr_flower.routing import provenance
from rcsr_flower.runtime.processes import (
    TAG_VAR,
    new_tag,
    private_database,
    remove_database,
    stop_process_group,
    stop_tagged,
    track,
    wait_healthy,
)

if TYPE_CHECKING:
    from rcsr_flower.config import RunConfig

CONNECTION = "rcsr-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def config_args(values: Mapping[str, object]) -> str:
    """``k=v ...`` with TOML values: what ``--run-config`` and ``--node-config`` parse."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def write_connection(
    flwr_home: Path, name: str, address: str | None, ca_cert: Path | None = None
) -> None:
    """``$FLWR_HOME/config.toml``: how ``flwr`` reaches the SuperLink ``name`` (TLS with
    ``ca_cert``, else insecure), the default; ``address`` None removes ``name``.

    The other connections in the file stay: launchers that share a Flower home (two suite
    runners in one checkout) each name their own SuperLink, and one that rewrote the file
    sent the other's next run to its SuperLink, or to none once it had stopped."""
    import tomllib

    from rcsr_flower.embedded.assets import file_lock

    path = flwr_home / "config.toml"
    if address is None and not path.exists():
        return  # nothing to remove (and no home to create: nothing was started there)
    with file_lock(flwr_home / "config.toml.lock"):
        try:
            table = tomllib.loads(path.read_text()).get("superlink", {}) if path.exists() else {}
        except tomllib.TOMLDecodeError:
            table = {}
        others = {k: v for k, v in table.items() if isinstance(v, dict) and k != name}
        if address is not None:
            security = {"root-certificates": str(ca_cert)} if ca_cert else {"insecure": True}
            others[name] = {"address": address, **security}
        default = name if address is not None else table.get("default")
        if default not in others:
            default = next(iter(others), None)
        lines = ["[superlink]"] + ([f"default = {toml_value(default)}"] if default else [])
        for key, entry in others.items():
            lines += ["", f"[superlink.{key}]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        tmp = path.with_name(f"config.toml.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)


def flwr_run_command(
    app_dir: Path,
    connection: str,
    raw_run_config: Sequence[str],
    overrides: Mapping[str, object],
    *options: str,
    quote: bool = True,
    staged_from: Path | None = None,
) -> list[str]:
    """``flwr run APP CONNECTION --stream OPTIONS --run-config ...`` with this interpreter's
    Flower, printed as it runs: the raw ``-c`` strings first, ``overrides`` last (they win).
    ``quote``: quote bare string values by this app's schema (:func:`quote_bare_strings`).
    ``staged_from``: ``app_dir`` is a staged copy of that app (``rcsr_flower.runtime.fab``), which
    the printed command names instead, so that it can be run again by hand."""
    cmd = [sys.executable, "-m", "flwr.cli.app", "run", str(app_dir), connection, "--stream"]
    cmd += options
    for raw in quote_bare_strings(raw_run_config) if quote else raw_run_config:
        cmd += ["--run-config", raw]
    cmd += ["--run-config", config_args(overrides)]
    shown = ["flwr", *cmd[3:]]
    if staged_from is not None:
        shown[2] = str(staged_from)
    note = "  # bundled from a staged copy of its FAB's files" if staged_from else ""
    print("$ " + shlex.join(shown) + note, flush=True)
    return cmd


def flower_executable(name: str) -> str:
    """This interpreter's Flower entry point (``flower-superlink``...), else PATH's."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for one Flower process: its own ``FLWR_HOME``, offline, no uv sync."""
    env = {**os.environ, **(extra or {})}
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's raylet starts one idle Python worker per CPU when the first driver connects,
    # in the driver's runtime environment; Flower's actors run in another (it sets
    # PYTHONPATH), so those workers only cost their start-up: 0.9 s to actors ready
    # (7.8 -> 6.9 s, ray.init and two actors importing torch, 4 runs each)
    env.setdefault("RAY_prestart_worker_first_driver", "0")
    # Flower's simulation calls ray.init() without an address, and Ray then joins the
    # cluster named in <ray temp dir>/ray_current_cluster, which any `ray start` on this
    # machine writes and a killed cluster leaves behind: the run joined someone else's
    # cluster, or waited forever on a dead one (seen here). "local" always starts the
    # run's own; a RAY_ADDRESS the user set is kept.
    if not env.get("RAY_ADDRESS"):
        env["RAY_ADDRESS"] = "local"
    # Threads that wait for work sleep instead of spinning: torch's OpenMP threads spin by
    # default, and with several torch processes on the same cores (SuperNodes, the
    # ServerApp, Ray actors beside it) each spins on the core another needs. Measured
    # here (2 cores, one client's local epoch, 2 threads per process): 5.2 s alone; two
    # processes at once 22-29 s in one session and 178 s in separate sessions (Linux
    # gives each session an equal share), against 10 s with passive waiting; alone it
    # costs nothing measurable (docs/development.md).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # glibc gives a thread that finds the main heap busy an arena of its own, up to 8 per
    # core, and keeps each arena's freed pages: the ServerApp's gRPC, Ray and evaluation
    # threads held 0.5 GB in 64 MB arenas. Two arenas: the default run's peak 3.25 ->
    # 2.98 GB PSS, the ServerApp's 1.10 -> 0.82 GB (benchmarks/memory.py, 6 rounds, one
    # run each; with rcsr_flower.heap's trim after each message too: 2.82 and 0.71)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    # Flower spawns the ServerApp/ClientApp with `python`: make it this interpreter's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class LaunchError(RuntimeError):
    """The run cannot be submitted: a bad run config, or data the run cannot find."""


def check_run_config(
    app_dir: Path, raw_run_config: list[str], overrides: dict[str, object]
) -> RunConfig:
    """Validate the run config here first: the SuperLink refuses an unknown key with
    only "Invalid run configuration.", and the ServerApp never starts to name it."""
    from flwr.common.config import parse_config_args

    from rcsr_flower.config import RunConfig

    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    table = pyproject["tool"]["flwr"]["app"]["config"]
    given = parse_config_args(quote_bare_strings(raw_run_config))
    return RunConfig.from_flower({**table, **given, **overrides})


THIS_APP = "rcsr-flower"  # [project] name of this repository's app


def app_table(app_dir: Path) -> dict:
    """An app's ``pyproject.toml`` (its ``[project]`` and ``[tool.flwr.app]``)."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LaunchError(f"--app-dir {app_dir}: cannot read {path}: {exc}") from None


def is_this_app(app_dir: Path) -> bool:
    """Whether ``app_dir`` is this repository's retrieval app, whose run config, data and
    assets the launcher checks and prepares; an app whose ``pyproject.toml`` names
    another project is run as it is. An unreadable one counts as this app, whose checks
    then say what is wrong."""
    try:
        name = app_table(app_dir).get("project", {}).get("name")
    except LaunchError:
        return True
    return name == THIS_APP


def check_app_config(
    app_dir: Path, raw_run_config: list[str], overrides: dict[str, object]
) -> dict[str, object]:
    """Another app's run config, checked as far as its ``pyproject.toml`` tells: every key
    must be in its ``[tool.flwr.app.config]`` (the SuperLink refuses an unknown one with
    only "Invalid run configuration."), which must have ``output-dir`` and ``run-name``
    (where its ``result.json`` is read: ``rcsr_flower.routing.runner`` writes it). Values are the
    app's to check, in its ServerApp."""
    from flwr.common.config import parse_config_args

    pyproject = app_table(app_dir)
    name = pyproject.get("project", {}).get("name", str(app_dir))
    table = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    for key in ("output-dir", "run-name"):
        if key not in table:
            raise LaunchError(
                f"app {name!r} ({app_dir}) has no '{key}' in [tool.flwr.app.config]: the "
                "launcher reads <output-dir>/<run-name>/result.json, which "
                "rcsr_flower.routing.runner writes (docs/extending.md)"
            )
    try:
        given = parse_config_args(list(raw_run_config))
    except Exception as exc:  # click's "invalid format", a missing .toml file
        raise LaunchError(f"-c {' '.join(raw_run_config)!r}: {exc}") from None
    for key in [*given, *overrides]:
        if key not in table:
            raise LaunchError(
                f"unknown run-config key '{key}' for app {name!r}; its keys: "
                f"{', '.join(sorted(table))}"
            )
    return {**table, **given, **overrides}


# flwr's own pattern for one ``key=value`` of a ``-c`` string (flwr.common.config)
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def quote_bare_strings(raw_run_config: Sequence[str]) -> list[str]:
    """The ``-c`` strings with unquoted values of string keys quoted.

    ``-c strategy=fedavg`` is not TOML, and flwr refuses it with a generic "invalid
    format" naming no key. The schema knows which keys are strings: their values are
    taken as written (``run-name=2024`` is the name "2024"). A value of another type
    that is not TOML raises :class:`LaunchError` naming the key. A ``.toml`` file and
    values that already parse are passed on unchanged; unknown keys too (quoted if
    bare), for the schema to name them.
    """
    import dataclasses

    from rcsr_flower.config import RunConfig

    kinds = {
        f.name.replace("_", "-"): f.type if isinstance(f.type, str) else f.type.__name__
        for f in dataclasses.fields(RunConfig)
    }
    out = []
    for raw in raw_run_config:
        if raw.strip().endswith(".toml"):
            out.append(raw)
            continue
        pairs = []
        for key, value in _PAIR.findall(raw):
            try:
                parsed = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                parsed = None
            kind = kinds.get(key, "str")
            if kind == "str" and not isinstance(parsed, str):
                value = json.dumps(value)  # as written: a JSON string is a TOML string
            elif parsed is None:
                raise LaunchError(
                    f"run-config '{key}' = {value}: not a valid {kind} "
                    f'(-c "{key}=..." takes TOML values: numbers, true/false, "strings")'
                )
            pairs.append(f"{key}={value}")
        out.append(" ".join(pairs))
    return out


def prepare_run(cfg: RunConfig, num_partitions: int, env: dict[str, str]) -> None:
    """Build here, before submitting, what every process of the run would otherwise wait
    for in silence on a first run: the embedded assets (about 1.5 minutes, their log on
    this console) and the run's semantic partition (the caption embedding, with every
    core; in the run it would start in a one-thread Ray actor while the others wait).

    Both are cached on disk under a lock, keyed by everything that determines them, so
    the run finds them; with a warm cache this takes about a second.
    """
    import dataclasses

    from rcsr_flower.federation import prepare_partition

    cache_dir = cfg.cache_dir or env.get("RCSR_CACHE_DIR", "")
    started = time.perf_counter()
    path = prepare_partition(dataclasses.replace(cfg, cache_dir=cache_dir), num_partitions)
    print(f"data ready in {time.perf_counter() - started:.1f} s (partition: {path})", flush=True)


def run_outcome(output_dir: Path, run_name: str, code: int | None, timeout: float) -> dict:
    """What became of a submitted run: ``result.json`` (written last by the ServerApp)
    corrected by how ``flwr run`` ended (``code`` None = it timed out)."""
    result_path = output_dir / run_name / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {
            "status": "failed",
            "error": "the ServerApp wrote no result.json (it failed before its run started; "
            "its traceback is in the log above)",
        }
    if code is None:
        result = {**result, "status": "failed", "error": f"timed out after {timeout} s"}
    elif code != 0 and result.get("status") == "completed":
        result = {**result, "status": "failed", "error": f"flwr run exited {code}"}
    if result.get("status") == "running":
        result = {
            **result,
            "status": "failed",
            "error": "the run ended without finishing (see the SuperLink log)",
        }
    return result


@dataclass
class SimulationLauncher:
    """A private SuperLink in simulation mode and one ``flwr run`` against it."""

    app_dir: Path
    flwr_home: Path
    num_supernodes: int = 10
    cpus_per_client: int = 1
    gpus_per_client: float = 0.0
    run_config: dict[str, object] = field(default_factory=dict)
    raw_run_config: list[str] = field(default_factory=list)  # e.g. ["alpha=1.0 seed=3"]
    timeout: float = 1800.0
    env: dict[str, str] = field(default_factory=dict)
    prepare: bool = True  # build assets and partition before submitting (prepare_run)
    # runs share one Ray cluster started with the SuperLink (rcsr_flower.runtime.ray_head) unless
    # RAY_ADDRESS is set (the environment's or ``env``'s): a cluster's address, or
    # "local" for a cluster of each run's own (Flower's way)
    ray_head: bool = True

    def __post_init__(self) -> None:
        self.app_dir = Path(self.app_dir).resolve()
        self.flwr_home = Path(self.flwr_home).resolve()
        self.port = free_port()
        self.control_port = free_port()
        self.process: subprocess.Popen | None = None
        self.ray_process: subprocess.Popen | None = None
        self.ray_head = self.ray_head and not {**os.environ, **self.env}.get("RAY_ADDRESS")
        self.ray_port = free_port() if self.ray_head else None
        self._checked: dict[str, object] | None = None  # the overrides check() accepted
        self.tag = new_tag()  # in the environment of every process this launcher starts
        # its own entry in $FLWR_HOME/config.toml, which other launchers may share
        self.connection = f"{CONNECTION}-{self.tag[:12]}"
        self.own_app = is_this_app(self.app_dir)  # else: no schema, no data to prepare

    # ------------------------------------------------------------------ environment
    def _env(self) -> dict[str, str]:
        env = {**flower_env(self.flwr_home, self.env), TAG_VAR: self.tag}
        if self.ray_port is not None:
            env["RAY_ADDRESS"] = f"127.0.0.1:{self.ray_port}"
        return env

    @property
    def ray_log(self) -> Path:
        """The Ray cluster's output, appended to by every launcher of this home."""
        return self.flwr_home / "ray-head.log"

    @property
    def ray_ready_file(self) -> Path:
        """Written by the Ray cluster once up: its ``gcs_address`` and ``session_dir``."""
        return self.flwr_home / f"ray-head-{self.tag[:16]}.json"

    def alive(self) -> bool:
        """The SuperLink, and the Ray cluster when the launcher runs one, still run."""
        running = [p for p in (self.process, self.ray_process) if p is not None]
        return bool(running) and all(p.poll() is None for p in running)

    @property
    def database(self) -> Path:
        """This launcher's own SuperLink state, deleted when it stops (:func:`private_database`)."""
        return private_database(self.flwr_home, self.tag)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        write_connection(self.flwr_home, self.connection, f"127.0.0.1:{self.port}")
        if self.ray_head:  # first: it comes up while the SuperLink does
            self._start_ray_head()
        log_file = self.flwr_home / "superlink.log"
        cmd = [
            flower_executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--database",
            str(self.database),
            "--log-file",
            str(log_file),
            "--disable-runtime-dependency-installation",
        ]
        self.process = subprocess.Popen(
            cmd,
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        track(self.tag, self.process)
        wait_healthy(self.process, f"http://127.0.0.1:{self.port}/health", log_file)

    def _start_ray_head(self) -> None:
        """``python -m rcsr_flower.runtime.ray_head`` on the GCS port the runs were given."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.ray_ready_file.unlink(missing_ok=True)
        # a new cluster of its own ("local", never one another `ray start` left), whose
        # address the SuperLink's environment named before it was up
        env = {**self._env(), "RAY_ADDRESS": "local", "RAY_GCS_SERVER_PORT": str(self.ray_port)}
        with open(self.ray_log, "ab") as log:
            self.ray_process = subprocess.Popen(
                [sys.executable, "-m", "rcsr_flower.runtime.ray_head", str(self.ray_ready_file)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        track(self.tag, self.ray_process)

    def _check_ray_head(self) -> None:
        """Not waited for: a run's ``ray.init`` waits until the cluster is up (4-5 s
        after the launcher started it, while the SuperLink, ``flwr run`` and the
        simulation process start). A cluster that failed to start is said here."""
        if self.ray_process is not None and self.ray_process.poll() is not None:
            raise LaunchError(
                f"the Ray cluster for the simulations exited with code "
                f"{self.ray_process.returncode}; see {self.ray_log} (or "
                "set RAY_ADDRESS=local to let each run start its own)"
            )

    def stop(self) -> None:
        """Stop the SuperLink, its whole process group (ServerApp, simulation), the Ray
        cluster and anything else this launcher started (by its tag)."""
        stop_process_group(self.process, self.ray_process)
        stop_tagged(self.tag)
        self.process = self.ray_process = None
        self.ray_ready_file.unlink(missing_ok=True)
        remove_database(self.database)
        write_connection(self.flwr_home, self.connection, None)

    def check(self, run_name: str, output_dir: Path) -> dict[str, object]:
        """Validate the run config and build what the run needs (:func:`prepare_run`);
        raise :class:`LaunchError` with the reason. Returns the run's overrides.

        ``main`` calls it before starting the SuperLink, so a bad key or missing data
        fails before anything starts; ``run`` calls it too (a no-op the second time)."""
        overrides = {**self.run_config, "run-name": run_name, "output-dir": str(output_dir)}
        if self._checked == overrides:
            return overrides
        if not self.own_app:  # its ServerApp checks its values; result.json says how it went
            check_app_config(self.app_dir, self.raw_run_config, overrides)
            self._checked = dict(overrides)
            return overrides
        try:
            cfg = check_run_config(self.app_dir, self.raw_run_config, overrides)
        except Exception as exc:  # ConfigError, or -c strings flwr cannot parse
            raise LaunchError(f"{type(exc).__name__}: {exc}") from None
        if self.prepare:
            try:
                prepare_run(cfg, self.num_supernodes, self._env())
            except Exception as exc:  # a missing dataset or model: say so before submitting
                raise LaunchError(f"preparing the data: {exc}") from None
        self._checked = dict(overrides)
        return overrides

    def run(self, run_name: str, output_dir: Path) -> dict:
        """Submit the app, stream its logs, and return ``result.json`` (or a failure)."""
        try:
            overrides = self.check(run_name, output_dir)
            self._check_ray_head()
        except LaunchError as exc:
            return {"status": "failed", "error": str(exc)}
        from rcsr_flower.runtime.fab import stage_app  # imports Flower's CLI: only when submitting

        self.flwr_home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.flwr_home, prefix="app-") as staged:
            cmd = flwr_run_command(
                stage_app(
                    self.app_dir, Path(staged)
                ),  # the FAB's files only (rcsr_flower.runtime.fab)
                self.connection,
                self.raw_run_config,
                overrides,
                "--federation-config",
                f"num-supernodes={self.num_supernodes} "
                f"client-resources-num-cpus={self.cpus_per_client} "
                f"client-resources-num-gpus={self.gpus_per_client}",
                quote=self.own_app,
                staged_from=self.app_dir,
            )
            try:
                proc = subprocess.run(cmd, env=self._env(), timeout=self.timeout, check=False)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        return run_outcome(output_dir, run_name, code, self.timeout)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every launcher shares (this one and ``rcsr_flower.runtime.deploy``)."""
    parser.add_argument("--app-dir", default=".")
    parser.add_argument(
        "--output-dir", default="", help='default: -c output-dir="...", else outputs'
    )
    parser.add_argument(
        "--run-name", default="", help='default: -c run-name="...", else <kind>-<date>-<time>'
    )
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        help='run-config overrides, e.g. -c "num-server-rounds=2 alpha=1.0"',
    )


def start_cli(args: argparse.Namespace, kind: str) -> tuple[str, Path]:
    """Set up a launcher's command line: INFO logs on the console, and SIGTERM (CI
    timeouts, ``kill``) unwinding through the caller's ``finally``, which stops what it
    started (and :func:`track`'s handler, which stops it first). Returns ``(run name,
    output directory)``: ``--run-name``/``--output-dir``, else ``run-name``/``output-dir``
    given with ``-c``, else a timestamped name in ``outputs``. Raises
    :class:`LaunchError` when ``-c`` cannot be read or contradicts the options."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from flwr.common.config import parse_config_args

    if is_this_app(Path(args.app_dir)):  # another app's -c strings go on as written
        args.run_config = quote_bare_strings(args.run_config)
    try:
        given = parse_config_args(args.run_config)
    except Exception as exc:  # click's "invalid format", a missing .toml file
        raise LaunchError(f"-c {' '.join(args.run_config)!r}: {exc}") from None
    chosen = {}
    for key, option in (("run-name", args.run_name), ("output-dir", args.output_dir)):
        value = given.get(key)
        if option and value is not None and str(value) != option:
            raise LaunchError(
                f"{key} given twice: --{key} {option!r} and -c {key}={value!r}; give one"
            )
        chosen[key] = option or (str(value) if value is not None else "")
    name = chosen["run-name"] or time.strftime(f"{kind}-%Y%m%d-%H%M%S")
    return name, Path(chosen["output-dir"] or "outputs").resolve()


def report(result: dict, path: Path, logs: str | None, figures: bool = True) -> int:
    """Print the outcome; the exit code: 0 only for a completed run. ``logs``: where to
    look, or None when the run failed before anything was started; ``figures``: the
    retrieval app's plotting hint."""
    if result.get("status") != "completed":
        where = f"\nlogs: {logs}" if logs else ""
        error = result.get("error", "unknown error")
        print(f"\nRUN FAILED ({path}): {error}{where}", file=sys.stderr)
        return 1
    print(f"\nrun completed in {result.get('seconds')} s: {path}")
    if figures:
        print(f"figures: python -m rcsr_flower.experiments.plot {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rcsr_flower.runtime.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    parser.add_argument("--flwr-home", default=".flwr")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        run_name, output_dir = start_cli(args, "run")
    except LaunchError as exc:
        return report(
            {"status": "failed", "error": str(exc)}, Path(args.output_dir or "outputs"), None
        )
    launcher = SimulationLauncher(
        app_dir=Path(args.app_dir),
        flwr_home=Path(args.flwr_home),
        num_supernodes=args.num_supernodes,
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        raw_run_config=args.run_config,
        timeout=args.timeout,
    )
    try:
        launcher.check(run_name, output_dir)  # before anything starts
        launcher.start()
        result = launcher.run(run_name, output_dir)
    except LaunchError as exc:
        result = {"status": "failed", "error": str(exc)}
    finally:
        launcher.stop()
    if result.get("status") == "completed":  # which code and machine, for the figures
        provenance.record(output_dir / run_name, launcher.app_dir)
    log_file = launcher.flwr_home / "superlink.log"
    logs = str(log_file) if log_file.exists() else None
    return report(result, output_dir / run_name, logs, figures=launcher.own_app)


if __name__ == "__main__":
    sys.exit(main())
