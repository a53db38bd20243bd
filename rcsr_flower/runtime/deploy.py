"""A Flower deployment on this machine: one SuperLink and N SuperNodes as separate processes.

``docs/deployment.md`` runs the same pieces on separate machines; this launcher runs them
on loopback, exactly as there (each process with its own ``FLWR_HOME``, port and log, TLS
and SuperNode authentication on by default), so the deployment path is exercised by the
tests and can be tried on one machine first. With ``network`` (``--separate-hosts``, as
root) every process runs on a host of its own instead (``rcsr_flower.runtime.netns``),
optionally behind slow links (``rcsr_flower.runtime.slowlink``):

1. writes a CA, a server certificate for 127.0.0.1/localhost (and the SuperLink's
   address on separate hosts) and one EC key per node (OpenSSH format), unless
   ``--insecure``;
2. starts ``flower-superlink`` (runtime dependency installation off, SuperNode auth on);
3. registers each node's public key with ``flwr supernode register``;
4. starts ``flower-supernode`` i with ``--node-config "partition-id=i num-partitions=N
   worker-idle-s=600"`` (a warm worker per node, ``rcsr_flower.client.node_worker``;
   ``--node-config worker-idle-s=0`` for none) and waits until all N have joined;
5. submits the app with ``flwr run . <connection> --stream`` (connection in the user's
   ``$FLWR_HOME/config.toml``) and an absolute ``output-dir``;
6. exits non-zero unless the ServerApp's ``result.json`` says ``completed``;
7. always stops every process it started (by process group).

Logs (timestamped, colour codes stripped) go to ``<root>/superlink.log``,
``<root>/node-<i>.log`` and ``<root>/run.log`` (the ServerApp's output).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rcsr_flower.config import WORKER_IDLE_KEY as IDLE_KEY
from rcsr_flower.runtime.launch import (
    LaunchError,
    add_run_arguments,
    check_run_config,
    config_args,
    flower_env,
    flower_executable,
    flwr_run_command,
    free_port,
    report,
    run_outcome,
    start_cli,
    write_connection,
)
from rcsr_flower.runtime.netns import Network, deployment_hosts
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
from rcsr_flower.runtime.slowlink import Link

CONNECTION = "rcsr-deploy"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
WORKER_IDLE_S = 600  # a node's worker outlives a pause between runs of up to 10 minutes


# ============================================================================ credentials
@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def write_tls_certificates(
    directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 30
) -> TlsFiles:
    """A private CA and a SuperLink certificate it signs, valid for ``hosts`` (SAN).

    The same files ``deploy/generate-certificates.sh`` makes with openssl.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rcsr-flower CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    pem = serialization.Encoding.PEM
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    for path, key in ((directory / "ca.key", ca_key), (files.server_key, server_key)):
        path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        path.chmod(0o600)
    return files


def write_node_key(path: Path) -> Path:
    """A SuperNode's EC (P-384) key pair in OpenSSH format: ``path`` and ``path.pub``.

    The same files ``ssh-keygen -t ecdsa -b 384 -N "" -f path`` makes.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = path.with_name(path.name + ".pub")
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return public


# ============================================================================ processes
class LoggedProcess:
    """A Flower process in its own session; its output, timestamped, goes to ``log_file``.

    Its own session, so stopping it stops what it spawned (SuperExec, ClientApp and
    ServerApp processes); timestamps, because Flower's console lines carry none and the
    per-message times of a deployment are read off these logs.
    """

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        log_file: Path,
        cwd: Path | None = None,
        echo: bool = False,
    ) -> None:
        self.cmd = cmd
        self.log_file = log_file
        self.echo = echo
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as fh:  # a restarted node appends to its log
            self._offset = fh.tell()
            fh.write(f"$ {shlex.join(cmd)}\n")
        self.process = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        if TAG_VAR in env:  # stopped with its launcher, also on a signal (processes.track)
            track(env[TAG_VAR], self.process)
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_file, "a") as fh:
            for raw in self.process.stdout:
                line = _ANSI.sub("", raw.rstrip("\n"))
                fh.write(f"{dt.datetime.now().strftime('%H:%M:%S.%f')[:-3]} {line}\n")
                fh.flush()
                if self.echo:
                    print(line, flush=True)

    def text(self) -> str:
        """This process's part of the log (a restarted node appends to the same file)."""
        if not self.log_file.exists():
            return ""
        with open(self.log_file, errors="replace") as fh:
            fh.seek(self._offset)
            return fh.read()

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match | None:
        """The first match of ``pattern`` in the log; None on timeout or process exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := regex.search(self.text()):
                return match
            if self.process.poll() is not None:
                self._pump.join(timeout=2)
                return regex.search(self.text())
            time.sleep(0.2)
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after ``timeout``."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._pump.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group: a machine that dies, not one that leaves."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        stop_process_group(self.process)
        self._pump.join(timeout=5)


@dataclass
class SuperNode:
    index: int
    port: int
    home: Path
    key: Path | None
    proc: LoggedProcess
    node_id: int | None = None


# ============================================================================ deployment
@dataclass
class LocalDeployment:
    """One SuperLink and ``num_supernodes`` SuperNodes on loopback, and runs against them."""

    app_dir: Path
    root: Path  # everything this deployment writes: homes, credentials, logs
    num_supernodes: int = 2
    num_partitions: int | None = None  # None = num_supernodes; more = deploy a subset
    secure: bool = True  # TLS + SuperNode authentication
    # extra keys, every node; a warm worker per node unless worker-idle-s=0 (node_worker)
    node_config: dict[str, object] = field(default_factory=lambda: {IDLE_KEY: WORKER_IDLE_S})
    run_config: dict[str, object] = field(default_factory=dict)
    raw_run_config: list[str] = field(default_factory=list)
    timeout: float = 3600.0
    env: dict[str, str] = field(default_factory=dict)
    # separate hosts: the SuperLink on host "superlink", the user on "user", SuperNode i on
    # "node-<i>", each in its own network namespace (rcsr_flower.runtime.netns); None: loopback
    network: Network | None = None
    # with a network: every node's link to the SuperLink (a proxy in front of it); None: direct
    link: Link | None = None

    def __post_init__(self) -> None:
        self.app_dir = Path(self.app_dir).resolve()
        self.root = Path(self.root).resolve()
        self.port = free_port()
        self.superlink: LoggedProcess | None = None
        self.supernodes: list[SuperNode] = []
        self.tls: TlsFiles | None = None
        self.run_proc: LoggedProcess | None = None
        self.slowlink: LoggedProcess | None = None
        self.tag = new_tag()  # in the environment of every process this deployment starts

    @property
    def user_home(self) -> Path:
        """``FLWR_HOME`` of the person who submits runs (holds ``config.toml``)."""
        return self.root / "user"

    @property
    def host(self) -> str:
        """The SuperLink's address as nodes and users reach it (its certificate's name)."""
        return "127.0.0.1" if self.network is None else self.network.address("superlink")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _on(self, host: str, cmd: list[str]) -> list[str]:
        """``cmd`` run on ``host`` of the network (unchanged on loopback)."""
        return cmd if self.network is None else self.network.command(host, cmd)

    @property
    def database(self) -> Path:
        """The SuperLink's state for this deployment only (its nodes are registered
        again at every start), deleted when it stops (:func:`private_database`)."""
        return private_database(self.root / "superlink", self.tag)

    def _env(self, home: Path) -> dict[str, str]:
        return {**flower_env(home, self.env), TAG_VAR: self.tag}

    # ------------------------------------------------------------------ SuperLink
    def start(self) -> None:
        """SuperLink, user connection, node keys (registered), and all SuperNodes."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.secure:
            # as the guide says: loopback too, which the SuperLink's own SuperExec dials
            hosts = ("127.0.0.1", "localhost")
            hosts += () if self.network is None else (self.host,)
            self.tls = write_tls_certificates(self.root / "certificates", hosts)
        self.start_superlink()
        self.write_connection()
        for i in range(self.num_supernodes):
            key = None
            if self.secure:
                key = self.root / "keys" / f"node-{i}"
                self.register(write_node_key(key))
            self.start_supernode(i, key)
        for node in self.supernodes:
            self.wait_joined(node)

    def start_superlink(self) -> None:
        """The SuperLink (again, after :meth:`kill_superlink`: same database, so the
        registered nodes stay registered) and, with a slow ``link``, the proxy in front."""
        home = self.root / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        cmd = [flower_executable("flower-superlink")]
        if self.tls is None:
            cmd += ["--insecure"]
        else:
            cmd += [
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--ssl-certfile",
                str(self.tls.server_cert),
                "--ssl-keyfile",
                str(self.tls.server_key),
                "--enable-supernode-auth",
            ]
        # on separate hosts every interface, as the guide has it; behind a slow link only its
        # host's loopback, while the proxy takes the host's address
        bind = "127.0.0.1" if self.network is None or self.link is not None else "0.0.0.0"
        cmd += [
            "--host",
            bind,
            "--port",
            str(self.port),
            "--database",
            str(self.database),
            "--disable-runtime-dependency-installation",
        ]
        log_file = self.root / "superlink.log"
        cmd = self._on("superlink", cmd)
        self.superlink = LoggedProcess(cmd, self._env(home), log_file, cwd=home)
        scheme = "http" if self.tls is None else "https"
        cafile = self.tls.ca_cert if self.tls else None

        def healthy(address: str) -> Callable[[], None]:
            def wait() -> None:
                assert self.superlink is not None
                url = f"{scheme}://{address}/health"
                wait_healthy(self.superlink.process, url, log_file, cafile=cafile)

            return wait

        if self.network is None:
            healthy(self.address)()
            return
        if self.link is not None:
            # the proxy listens only once the SuperLink answers behind it: a proxy that
            # accepted while the SuperLink was down would close connections mid-handshake,
            # and a SuperNode gives up for good after a TLS error (docs/deployment.md)
            self.network.call("superlink", healthy(f"127.0.0.1:{self.port}"))
            self.start_slowlink()
        self.network.call("user", healthy(self.address))  # as nodes and users reach it

    def start_slowlink(self) -> None:
        """The proxy that makes every link to the SuperLink ``link`` (delay, bandwidth),
        on the SuperLink's host: TLS passes through it, the certificate still matches."""
        assert self.network is not None and self.link is not None
        cmd = [
            sys.executable,
            "-m",
            "rcsr_flower.runtime.slowlink",
            "--listen",
            self.address,
            "--upstream",
            f"127.0.0.1:{self.port}",
            "--delay-ms",
            f"{self.link.delay * 1000:g}",
        ]
        if self.link.rate is not None:
            cmd += ["--rate-mbit", f"{self.link.rate * 8 / 1e6:g}"]
        self.slowlink = LoggedProcess(
            self._on("superlink", cmd), self._env(self.root), self.root / "slowlink.log"
        )
        if not self.slowlink.wait_for("slow link listening", 60):
            raise RuntimeError(f"the slow link did not start; see {self.slowlink.log_file}")

    def kill_superlink(self) -> None:
        """The SuperLink's machine dies: SIGKILL it and what it started (the ServerApp),
        and on separate hosts everything on its host (the slow link too). Its disk, the
        database included, survives; :meth:`start_superlink` starts it again."""
        assert self.superlink is not None
        self.superlink.kill()
        if self.network is not None:
            self.network.kill_all("superlink")
            if self.slowlink is not None:
                self.slowlink.wait(timeout=10)
                self.slowlink = None

    def write_connection(self) -> None:
        """``$FLWR_HOME/config.toml`` of the user: how ``flwr`` reaches the SuperLink."""
        write_connection(
            self.user_home, CONNECTION, self.address, self.tls.ca_cert if self.tls else None
        )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command as the user (their ``FLWR_HOME``)."""
        return subprocess.run(
            self._on("user", [sys.executable, "-m", "flwr.cli.app", *args]),
            env=self._env(self.user_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register(self, public_key: Path) -> None:
        out = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if out.returncode != 0:
            raise RuntimeError(
                f"flwr supernode register {public_key} failed ({out.returncode}): "
                f"{_ANSI.sub('', out.stdout + out.stderr).strip()}"
            )

    # ------------------------------------------------------------------ SuperNodes
    def start_supernode(
        self, index: int, key: Path | None = None, extra_args: Sequence[str] = ()
    ) -> SuperNode:
        """SuperNode ``index`` holding partition ``index`` of ``num_partitions``."""
        home = self.root / f"node-{index}"
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        node_config = {
            "partition-id": index,
            "num-partitions": self.num_partitions or self.num_supernodes,
            **self.node_config,
        }
        cmd = [flower_executable("flower-supernode")]
        if self.tls is None:
            cmd += ["--insecure"]
        else:
            cmd += ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += [
            "--superlink",
            self.address,
            "--port",
            str(port),
            "--node-config",
            config_args(node_config),
            *extra_args,
        ]
        cmd = self._on(f"node-{index}", cmd)
        proc = LoggedProcess(cmd, self._env(home), self.root / f"node-{index}.log", cwd=home)
        node = SuperNode(index, port, home, key, proc)
        self.supernodes.append(node)
        return node

    def wait_joined(self, node: SuperNode, timeout: float = 300) -> int:
        """Wait until ``node`` is registered with the SuperLink; return its node id."""
        match = node.proc.wait_for(_NODE_ID, timeout)
        if match is None:
            raise RuntimeError(
                f"SuperNode {node.index} did not join in {timeout:.0f} s; see {node.proc.log_file}"
            )
        node.node_id = int(match.group(1))
        return node.node_id

    def kill_supernode(self, index: int) -> SuperNode:
        node = next(n for n in self.supernodes if n.index == index)
        node.proc.kill()
        return node

    # ------------------------------------------------------------------ runs
    def _overrides(
        self, run_name: str, output_dir: Path, extra: dict[str, object] | None = None
    ) -> dict[str, object]:
        return {
            **self.run_config,
            **(extra or {}),
            "run-name": run_name,
            "output-dir": str(output_dir),
        }

    def check(
        self, run_name: str, output_dir: Path, extra: dict[str, object] | None = None
    ) -> None:
        """Validate the run config before anything starts (raises ``ConfigError``): the
        SuperLink would refuse an unknown key with only "Invalid run configuration."."""
        overrides = self._overrides(run_name, output_dir, extra)
        check_run_config(self.app_dir, self.raw_run_config, overrides)

    def start_run(
        self, run_name: str, output_dir: Path, extra: dict[str, object] | None = None
    ) -> LoggedProcess:
        """Submit the app (``flwr run . CONNECTION --stream``); returns at once.

        ``extra``: run-config overrides for this run only."""
        overrides = self._overrides(run_name, output_dir, extra)
        from rcsr_flower.runtime.fab import stage_app  # imports Flower's CLI: only when submitting

        staged = self.root / "app"  # the FAB's files only (rcsr_flower.runtime.fab), fresh per run
        shutil.rmtree(staged, ignore_errors=True)
        stage_app(self.app_dir, staged)
        cmd = flwr_run_command(
            staged, CONNECTION, self.raw_run_config, overrides, staged_from=self.app_dir
        )
        self.run_proc = LoggedProcess(
            self._on("user", cmd), self._env(self.user_home), self.root / "run.log", echo=True
        )
        return self.run_proc

    def wait_run(self, run_name: str, output_dir: Path) -> dict:
        """Wait for the submitted run; ``result.json`` corrected by how ``flwr run`` ended."""
        assert self.run_proc is not None, "start_run first"
        code = self.run_proc.wait(timeout=self.timeout)
        if code is None:
            self.run_proc.stop()
        return run_outcome(output_dir, run_name, code, self.timeout)

    def run(self, run_name: str, output_dir: Path, extra: dict[str, object] | None = None) -> dict:
        try:
            self.check(run_name, output_dir, extra)
        except Exception as exc:  # ConfigError, or -c strings flwr cannot parse
            return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        self.start_run(run_name, output_dir, extra)
        return self.wait_run(run_name, output_dir)

    def stop(self) -> None:
        """Stop every process this deployment started, SuperNodes first, then anything
        left that carries its tag."""
        procs = [self.run_proc, *(n.proc for n in self.supernodes), self.superlink, self.slowlink]
        for proc in procs:
            if proc is not None:
                proc.stop()
        stop_tagged(self.tag)
        remove_database(self.database)


def parse_pairs(text: str) -> dict[str, object]:
    """``"a=1 b='x y'"`` -> ``{"a": 1, "b": "x y"}`` (node-config syntax, TOML values)."""
    import tomllib

    out: dict[str, object] = {}
    for item in shlex.split(text):
        key, _, value = item.partition("=")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rcsr_flower.runtime.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    parser.add_argument("--root", default=".deploy", help="homes, credentials and logs")
    parser.add_argument("--num-supernodes", type=int, default=2)
    parser.add_argument(
        "--num-partitions", type=int, default=None, help="default: --num-supernodes"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="no TLS, no SuperNode authentication"
    )
    parser.add_argument("--node-config", default="", help='extra keys for every node: "k=v ..."')
    parser.add_argument(
        "--separate-hosts",
        action="store_true",
        help="each process on a host of its own: a network namespace per host, 198.18.0.0/24 "
        "(root only; rcsr_flower.runtime.netns)",
    )
    parser.add_argument(
        "--link-delay-ms", type=float, default=0.0, help="with --separate-hosts: each way"
    )
    parser.add_argument(
        "--link-rate-mbit", type=float, default=None, help="with --separate-hosts: per node"
    )
    args = parser.parse_args(argv)
    slow = args.link_delay_ms > 0 or args.link_rate_mbit is not None
    if slow and not args.separate_hosts:
        parser.error("--link-delay-ms and --link-rate-mbit need --separate-hosts")
    try:
        run_name, output_dir = start_cli(args, "deploy")
    except LaunchError as exc:
        return report(
            {"status": "failed", "error": str(exc)}, Path(args.output_dir or "outputs"), None
        )
    deployment = LocalDeployment(
        app_dir=Path(args.app_dir),
        root=Path(args.root),
        num_supernodes=args.num_supernodes,
        num_partitions=args.num_partitions,
        secure=not args.insecure,
        node_config={IDLE_KEY: WORKER_IDLE_S, **parse_pairs(args.node_config)},
        raw_run_config=args.run_config,
        timeout=args.timeout,
    )
    if slow:
        rate = None if args.link_rate_mbit is None else args.link_rate_mbit * 1e6 / 8
        deployment.link = Link(args.link_delay_ms / 1000, rate)
    network = None
    try:
        deployment.check(run_name, output_dir)  # a bad key fails before anything starts
        if args.separate_hosts:
            deployment.network = network = Network(deployment_hosts(args.num_supernodes))
        deployment.start()
        result = deployment.run(run_name, output_dir)
    except Exception as exc:  # ConfigError, or a process that did not start
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        deployment.stop()
        if network is not None:
            network.close()
    logs = f"{deployment.root}/{{superlink,node-*,run}}.log" if deployment.root.exists() else None
    code = report(result, output_dir / run_name, logs)
    if code == 0:
        print(f"logs: {deployment.root}")
    return code


if __name__ == "__main__":
    sys.exit(main())
