"""Separate hosts for real: every host in a network namespace of its own, links that are
slow, cut or restored, and a SuperLink that dies (``rcsr_flower.runtime.netns``,
``rcsr_flower.runtime.slowlink``, ``LocalDeployment(network=...)``).

Skipped, with the reason, where this machine cannot make network namespaces (not root,
no iproute2). Every namespace lives in 198.18.0.0/24, which no real network routes, and
is removed when its test ends, is interrupted (SIGTERM/SIGINT) or, killed outright, by
the next network made on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rcsr_flower.runtime.deploy import LocalDeployment
from rcsr_flower.runtime.netns import (
    Network,
    NetworkError,
    deployment_hosts,
    namespaces,
    ours,
    unavailable,
)
from rcsr_flower.runtime.slowlink import Link, SlowLink

ROOT = Path(__file__).resolve().parents[1]
REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")


def mine() -> list[str]:
    """Namespaces this test process made."""
    return [n for n in namespaces() if ours(n) == os.getpid()]


def echo_server(sock: socket.socket) -> None:
    """Echo every connection ``sock`` accepts, on daemon threads."""

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def listener(address: str, port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen()
    return sock


# ============================================================================ fast
def test_hosts_have_their_own_addresses_and_a_cut_link_passes_nothing_until_restored():
    with Network(["superlink", "user", "node-0", "node-1"]) as net:
        assert net.hosts == {
            "superlink": "198.18.0.1",
            "user": "198.18.0.2",
            "node-0": "198.18.0.10",
            "node-1": "198.18.0.11",
        }
        assert len(mine()) == 5  # four hosts and the bridge's namespace
        server = net.call("superlink", lambda: listener("198.18.0.1"))
        port = server.getsockname()[1]
        echo_server(server)
        # the machine itself has no route to the hosts: nothing leaks either way
        with pytest.raises(OSError):
            socket.create_connection(("198.18.0.1", port), timeout=1)
        link = net.call("node-0", lambda: socket.create_connection(("198.18.0.1", port), 5))
        # each host sees its own address, not the machine's
        assert link.getsockname()[0] == "198.18.0.10"
        link.sendall(b"hello")
        assert link.recv(16) == b"hello"

        net.cut("node-0")
        link.settimeout(1.5)
        link.sendall(b"lost?")
        with pytest.raises(TimeoutError):
            link.recv(16)
        other = net.call("node-1", lambda: socket.create_connection(("198.18.0.1", port), 5))
        other.sendall(b"fine")  # the other hosts' links are not touched
        assert other.recv(16) == b"fine"

        net.restore("node-0")  # TCP retransmits what the cut held up
        link.settimeout(30)
        assert link.recv(16) == b"lost?"
        for s in (link, other, server):
            s.close()
    assert mine() == []


def test_a_slow_link_delays_each_way_throttles_and_passes_every_byte():
    upstream = listener("127.0.0.1")
    echo_server(upstream)
    link = Link(delay=0.1, rate=2e6 / 8)  # 100 ms each way, 2 Mbit/s
    proxy = SlowLink(("127.0.0.1", 0), ("127.0.0.1", upstream.getsockname()[1]), link)
    proxy.start()
    try:
        with socket.create_connection(proxy.listen, timeout=30) as conn:
            start = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            assert time.monotonic() - start >= 0.2  # there and back

            payload = os.urandom(250_000)  # 1 s at 2 Mbit/s, each way
            start = time.monotonic()
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            received = bytearray()
            while len(received) < len(payload):
                received += conn.recv(65536)
            sender.join()
            assert bytes(received) == payload
            assert time.monotonic() - start >= len(payload) / link.rate
    finally:
        proxy.close()
        upstream.close()


def test_a_slow_link_whose_server_is_down_resets_connections_as_a_bare_host_would():
    """Not an accepted connection closed cleanly: a SuperNode takes the EOF in its TLS
    handshake for a TLS error and stops reconnecting for good (Flower 1.42)."""
    closed = listener("127.0.0.1")
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    proxy = SlowLink(("127.0.0.1", 0), ("127.0.0.1", port), Link(delay=0.01))
    proxy.start()
    try:
        # the reset may come while connecting (the proxy was quick) or at the first read
        with (
            pytest.raises(ConnectionResetError),
            socket.create_connection(proxy.listen, timeout=30) as conn,
        ):
            conn.sendall(b"hello")
            assert conn.recv(16) != b"", "closed cleanly, not reset"
    finally:
        proxy.close()


INTERRUPTED = textwrap.dedent(
    """
    import subprocess, sys, time
    from rcsr_flower.runtime.netns import Network
    from rcsr_flower.runtime.processes import new_tag, track
    net = Network(["superlink", "node-0"])
    proc = subprocess.Popen(net.command("node-0", ["sleep", "600"]), start_new_session=True)
    track(new_tag(), proc)
    print(proc.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_network_leaves_no_namespace_and_no_process(sig):
    """SIGTERM/SIGINT: the maker removes its namespaces and what runs on them; SIGKILL
    gives it no chance, so the next network made on the machine sweeps them."""
    maker = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdout=subprocess.PIPE, text=True)
    try:
        sleeper = int(maker.stdout.readline())
        made = [n for n in namespaces() if ours(n) == maker.pid]
        assert len(made) == 3
        maker.send_signal(sig)
        maker.wait(timeout=60)
        if sig == signal.SIGKILL:
            assert set(made) <= set(namespaces())  # left behind ...
            Network(["superlink"]).close()  # ... until the next network sweeps them
        assert not set(made) & set(namespaces())
        deadline = time.monotonic() + 10
        while alive(sleeper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(sleeper)
    finally:
        if maker.poll() is None:
            maker.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its parent) is gone for our purposes
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_network_refuses_hosts_it_has_no_address_for():
    with pytest.raises(NetworkError, match="no address left for host 'node-300'"):
        Network(["superlink", "node-300"])
    assert mine() == []


# ============================================================================ Flower
NUM_PARTITIONS = 20  # as tests/test_deployment.py: the first 2 of 20 iid partitions


def small_run(embedded_assets, **extra) -> dict[str, object]:
    return {
        "cache-dir": str(embedded_assets.root.parent),
        "partitioning": "iid",
        "eval-max-images": 100,
        "batch-size": 32,
        "prototype-samples": 128,
        "fraction-train": 1.0,
        "round-timeout": 900.0,
        **extra,
    }


def on_hosts(tmp_path: Path, run_config: dict, link: Link | None = None):
    """Two SuperNodes, the SuperLink and the user each on a host of their own."""
    network = Network(deployment_hosts(2))
    deployment = LocalDeployment(
        app_dir=ROOT,
        root=tmp_path / "hosts",
        num_supernodes=2,
        num_partitions=NUM_PARTITIONS,
        run_config=run_config,
        timeout=1800,
        network=network,
        link=link,
    )
    return network, deployment


def rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def same_rows(a_rows: list[dict], b_rows: list[dict]) -> None:
    """Every field of every round equal but the wall clock (``seconds``); "dropped" is
    keyed by each deployment's random node ids, so its reasons are compared."""
    assert [r["round"] for r in a_rows] == [r["round"] for r in b_rows]
    for a, b in zip(a_rows, b_rows, strict=True):
        a, b = dict(a), dict(b)
        assert sorted(a.pop("dropped", {}).values()) == sorted(b.pop("dropped", {}).values())
        assert set(a.pop("seconds")) == set(b.pop("seconds"))
        assert a == b, a["round"]


def same_state(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    for name in ("adapters", "prototypes", "router"):
        x, y = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert set(x) == set(y), name
        for key in x:
            assert x[key].dtype == y[key].dtype, (name, key)
            assert x[key].numpy().tobytes() == y[key].numpy().tobytes(), (name, key)


def no_process_left(deployment: LocalDeployment) -> bool:
    procs = [
        deployment.superlink,
        deployment.slowlink,
        deployment.run_proc,
        *(n.proc for n in deployment.supernodes),
    ]
    return all(p is None or p.process.poll() is not None for p in procs)


def wait_for_count(proc, text: str, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.text().count(text) >= count:
            return True
        if proc.process.poll() is not None:
            break
        time.sleep(0.5)
    return proc.text().count(text) >= count


TRAIN = "Receiving: train message"


@pytest.mark.slow
def test_slow_links_change_no_number_and_a_superlink_that_dies_is_resumed_bit_identical(
    tmp_path, embedded_assets
):
    """Two SuperNodes, each on its own host, reach the SuperLink (TLS + node auth, its
    certificate naming its own address) over links of 100 ms each way and 20 Mbit/s:

    - a run over the slow links ends with the same numbers as on loopback;
    - the SuperLink's machine dies (SIGKILL, the ServerApp with it) as round 2's train
      messages arrive, and is started again on the same disk: the nodes, never touched,
      reconnect by themselves, and the run, submitted again with ``resume-from``, ends
      bit-identical to the uninterrupted one."""
    run_config = small_run(embedded_assets, **{"num-server-rounds": 2})
    outputs = tmp_path / "outputs"
    loopback = LocalDeployment(
        app_dir=ROOT,
        root=tmp_path / "loopback",
        num_supernodes=2,
        num_partitions=NUM_PARTITIONS,
        run_config=run_config,
        timeout=1800,
    )
    try:
        loopback.start()
        reference = loopback.run("loopback", outputs)
    finally:
        loopback.stop()
    assert reference["status"] == "completed", reference.get("error")

    network, deployment = on_hosts(tmp_path, run_config, Link(delay=0.1, rate=20e6 / 8))
    try:
        deployment.start()
        slow = deployment.run("slow", outputs)
        node = deployment.supernodes[0]
        trained = node.proc.text().count(TRAIN)
        deployment.start_run("killed", outputs)
        assert wait_for_count(node.proc, TRAIN, trained + 2, timeout=1200), "no round 2"
        deployment.kill_superlink()
        assert deployment.run_proc.wait(timeout=120) is not None  # `flwr run` lost it too
        deployment.start_superlink()
        resumed = deployment.run("killed", outputs, {"resume-from": str(outputs / "killed")})
        node_ids = [n.node_id for n in deployment.supernodes]
        logs = [n.proc.text() for n in deployment.supernodes]
    finally:
        deployment.stop()
        network.close()
    assert no_process_left(deployment) and mine() == []

    assert slow["status"] == "completed", slow.get("error")
    assert deployment.address == f"198.18.0.1:{deployment.port}"
    same_rows(rows(outputs, "loopback"), rows(outputs, "slow"))
    same_state(outputs / "loopback", outputs / "slow")
    slowlink = (deployment.root / "slowlink.log").read_text()
    assert "100 ms each way, 20 Mbit/s" in slowlink

    assert resumed["status"] == "completed", resumed.get("error")
    assert resumed["resumed_after_round"] == 1
    same_rows(rows(outputs, "slow"), rows(outputs, "killed"))
    same_state(outputs / "slow", outputs / "killed")
    for node_id, log in zip(node_ids, logs, strict=True):
        assert log.count("SuperNode ID") == 1 and str(node_id) in log  # never restarted


@pytest.mark.slow
def test_a_cut_link_rejoins_and_a_link_cut_for_good_ends_the_run(tmp_path, embedded_assets):
    """The guide's two-node federation (minimums 2) on separate hosts, personal adapters
    on every node:

    - run "cut": node 1's link is cut as round 2's train message reaches it, and stays
      cut until the SuperLink has marked the node offline (the heartbeat window) and the
      server waits for it. Round 2 ends without it; the link comes back, the node (whose
      process never stopped) is online again under its id and trains in round 3 from
      its live personal state, and the run completes;
    - run "lost": node 1's link is cut in round 1 and never comes back: the run ends by
      itself after ``node-wait-timeout``, failed, with the one-line error and the intact
      checkpoint to continue from."""
    run_config = small_run(
        embedded_assets, **{"personal-adapters": True, "personal-unimodal": True}
    )
    outputs = tmp_path / "outputs"
    network, deployment = on_hosts(tmp_path, run_config)
    try:
        deployment.start()
        victim = deployment.supernodes[1]
        deployment.start_run("cut", outputs, {"num-server-rounds": 3})
        assert wait_for_count(victim.proc, TRAIN, 2, timeout=1200), "no round 2"
        network.cut("node-1")
        waiting = deployment.run_proc.wait_for(r"waiting for nodes after train round 2: .*", 900)
        assert waiting, deployment.run_proc.text()[-3000:]
        network.restore("node-1")
        cut = deployment.wait_run("cut", outputs)

        trained = victim.proc.text().count(TRAIN)
        deployment.start_run("lost", outputs, {"num-server-rounds": 2, "node-wait-timeout": 30.0})
        assert wait_for_count(victim.proc, TRAIN, trained + 1, timeout=1200), "no round 1"
        network.cut("node-1")
        lost = deployment.wait_run("lost", outputs)
        victim_log = victim.proc.text()
    finally:
        deployment.stop()
        network.close()
    assert no_process_left(deployment) and mine() == []

    # cut: round 2 went on without node 1, which came back under its id and trained again
    assert cut["status"] == "completed", cut.get("error")
    assert "partitions not connected: 1;" in waiting.group(0), waiting.group(0)
    by_round = {r["round"]: r for r in rows(outputs, "cut")}
    assert sorted(by_round) == [0, 1, 2, 3]
    assert str(victim.node_id) in by_round[2]["dropped"]
    assert set(by_round[3]["weights"]) == {"0", "1"} and by_round[3]["skipped"] is False
    assert victim_log.count("SuperNode ID") == 1  # the same process, the same id
    # its personal state lived on in the node: nothing was reloaded from disk
    assert "restored client state" not in victim_log

    # lost: ended by itself, failed, saying how to go on from the intact checkpoint
    assert lost["status"] == "failed"
    error = lost["error"]
    assert "\n" not in error and error.startswith("NodeWaitTimeout: waited ")
    assert "for nodes after train round 1: 1 connected, 2 needed" in error
    assert f"continue with -c 'resume-from=\"{outputs / 'lost'}\"'" in error
    latest = json.loads((outputs / "lost" / "checkpoint" / "latest.json").read_text())
    assert latest["round"] == 0 and (outputs / "lost" / "checkpoint" / latest["tensors"]).is_file()
