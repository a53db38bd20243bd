"""Deployment: a real SuperLink and SuperNodes as separate processes on loopback.

What docs/deployment.md promises, checked through ``rcsr_flower.runtime.deploy``: TLS and
SuperNode authentication (an authorised node joins and a run completes; an unregistered
one is refused), a fresh ClientApp process per message, and a SuperNode killed mid-round
(the round finishes with the others, the lost node is named in the ServerApp's log).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rcsr_flower.runtime.deploy import LocalDeployment, main, parse_pairs, write_node_key
from rcsr_flower.runtime.launch import report

ROOT = Path(__file__).resolve().parents[1]

# Small and quick: 20 iid partitions of the embedded corpus, of which the tests deploy the
# first 2 or 3 (paired, image-only, text-only), about 270 training images each.
NUM_PARTITIONS = 20


def small_run(embedded_assets, **extra) -> dict[str, object]:
    return {
        "cache-dir": str(embedded_assets.root.parent),
        "partitioning": "iid",
        "eval-max-images": 100,
        "batch-size": 32,
        "prototype-samples": 128,
        "num-server-rounds": 1,
        **extra,
    }


def no_process_left(deployment: LocalDeployment) -> bool:
    procs = [deployment.superlink, deployment.run_proc, *(n.proc for n in deployment.supernodes)]
    return all(p is None or p.process.poll() is not None for p in procs)


# ============================================================================ fast
def test_parse_pairs_reads_node_config_syntax():
    assert parse_pairs("partition-id=0 data-dir='/data/my set' ratio=0.5 on=true") == {
        "partition-id": 0,
        "data-dir": "/data/my set",
        "ratio": 0.5,
        "on": True,
    }


def test_launcher_credentials_are_what_flower_needs(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from rcsr_flower.runtime.deploy import write_tls_certificates

    files = write_tls_certificates(tmp_path, hosts=("127.0.0.1", "localhost", "link.example"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]
    assert files.server_key.stat().st_mode & 0o077 == 0

    public = write_node_key(tmp_path / "node-0")
    private_key = load_ssh_private_key((tmp_path / "node-0").read_bytes(), None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert load_ssh_public_key(public.read_bytes()) == private_key.public_key()


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl, ssh-keygen"
)
def test_guide_scripts_make_the_same_kind_of_credentials(tmp_path):
    """deploy/*.sh, what docs/deployment.md tells users to run, give valid files."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    certs, keys = tmp_path / "certificates", tmp_path / "keys"
    subprocess.run(
        ["bash", ROOT / "deploy" / "generate-certificates.sh", certs, "127.0.0.1", "link.example"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["bash", ROOT / "deploy" / "generate-node-keys.sh", keys, "2"],
        check=True,
        capture_output=True,
    )
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert "link.example" in san.get_values_for_type(x509.DNSName)
    for i in range(2):
        assert (keys / f"node-{i}").is_file()
        load_ssh_public_key((keys / f"node-{i}.pub").read_bytes())


@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def test_the_server_names_nodes_that_did_not_answer(task_identity, caplog):
    """Matched by message id: the SuperLink's error for a lost node comes from its own id."""
    from unittest.mock import Mock

    from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
    from flwr.serverapp import Grid

    from rcsr_flower.routing.aggregation import unanswered
    from rcsr_flower.server.grid import PartitionOrderedGrid

    sent = []
    for node in (11, 12, 13):
        msg = Message(
            RecordDict({"config": ConfigRecord({"server-round": 4})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        msg.metadata.__dict__["_message_id"] = f"m{node}"  # what the grid's push does
        sent.append(msg)
    replies = [
        Message(RecordDict(), reply_to=sent[0]),
        Message(Error(code=5, reason="Error: Node Unavailable."), reply_to=sent[1]),
    ]
    assert [(m.metadata.dst_node_id, why) for m, why in unanswered(sent, replies)] == [
        (12, "Error: Node Unavailable."),
        (13, None),
    ]

    grid = Mock(spec=Grid)
    grid.send_and_receive.return_value = replies
    with caplog.at_level("WARNING", logger="rcsr_flower.server.grid"):
        got = PartitionOrderedGrid(grid, {11: 0, 12: 1, 13: 2}).send_and_receive(sent, timeout=30)
    assert got == replies
    assert [r.getMessage() for r in caplog.records] == [
        "train round 4: node 12 (partition 1) failed: Error: Node Unavailable; "
        "going on with the others",
        "train round 4: node 13 (partition 2) sent no reply within 30 s; going on with the others",
    ]


# ============================================================================ Flower
@pytest.mark.slow
def test_secure_federation_survives_a_supernode_killed_mid_round(tmp_path, embedded_assets):
    """One secure deployment (TLS + SuperNode auth, kept in one test for the suite's time):

    - an unregistered node is refused while three registered ones (paired, image-only,
      text-only) join;
    - the text-only node dies after receiving its train message: the round ends with the
      other two, the server's log names the lost node, the run completes;
    - every message starts a fresh ClientApp process, which does the work itself (no node
      worker: the rejoin test below runs with one, the deployment default);
    - a second run that fails in the ServerApp is reported as failed.

    Flower's heartbeat (30 s interval, patience 2) reports the dead node unavailable
    within a minute, so the round need not wait out ``round-timeout``, which bounds the
    wait for nodes that are alive but slow; here it is long for a loaded CI machine (a
    healthy round takes about a minute here). Every wait below is an upper bound, a few
    times what a loaded machine needs."""
    deployment = LocalDeployment(
        app_dir=ROOT,
        root=tmp_path / "deploy",
        num_supernodes=3,
        num_partitions=NUM_PARTITIONS,
        node_config={"worker-idle-s": 0},
        run_config=small_run(embedded_assets, **{"round-timeout": 600.0, "fraction-train": 1.0}),
        timeout=2400,
    )
    outputs = tmp_path / "outputs"
    try:
        deployment.start()  # returns once the three registered nodes have joined
        stranger_key = deployment.root / "keys" / "stranger"
        write_node_key(stranger_key)  # never registered
        stranger = deployment.start_supernode(3, stranger_key)
        victim = deployment.supernodes[2]
        deployment.start_run("killed", outputs)
        assert stranger.proc.wait(timeout=300) not in (0, None)
        assert victim.proc.wait_for(r"Receiving: train message", timeout=1200), "no train round"
        deployment.kill_supernode(2)
        result = deployment.wait_run("killed", outputs)
        failed = deployment.run("failed", outputs, {"min-train-nodes": NUM_PARTITIONS + 1})
    finally:
        deployment.stop()
    assert no_process_left(deployment)

    # the unregistered node
    assert "Failed to activate SuperNode" in stranger.proc.text()
    assert "SuperNode ID" not in stranger.proc.text()
    superlink = (deployment.root / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink
    assert "Uvicorn running on https://" in superlink  # TLS on
    assert superlink.count("[ControlServicer.RegisterNode] Created node_id") == 3

    # the killed node
    assert result["status"] == "completed", result.get("error")
    rows = [json.loads(x) for x in (outputs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert set(rows[1]["weights"]) == {"0", "1"} and rows[1]["skipped"] is False
    assert list(rows[1]["dropped"]) == [str(victim.node_id)], rows[1]["dropped"]
    server_log = (deployment.root / "run.log").read_text()
    named = re.search(
        rf"train round 1: node {victim.node_id} \(partition 2\) (sent no reply|failed).*"
        "going on with the others",
        server_log,
    )
    assert named, server_log[-3000:]
    # the deployed ServerApp pulls replies every 0.2 s and sends the adapters as one array
    assert "deployed grid: replies pulled every 0.2 s, messages through PackingGrid" in server_log

    # every message (query, train, evaluate) got a fresh ClientApp process
    for node in deployment.supernodes[:2]:
        log = node.proc.text()
        received = len(re.findall(r"Receiving: \w+ message", log))
        assert received >= 3  # the failed run asks nodes for the federation's size too
        assert log.count("Start `flwr-clientapp` process") == received
        assert log.count("ClientApp start-up (partition") >= 3  # those that loaded data

    # a run the ServerApp fails is reported as failed, with its reason
    assert failed["status"] == "failed"
    assert f"'min-train-nodes' = {NUM_PARTITIONS + 1} but the federation has" in failed["error"]


def count_in_log(proc, text: str) -> int:
    return proc.text().count(text)


def wait_for_count(proc, text: str, count: int, timeout: float) -> bool:
    """Wait until ``text`` occurs ``count`` times in ``proc``'s log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_in_log(proc, text) >= count:
            return True
        if proc.process.poll() is not None:
            return count_in_log(proc, text) >= count
        time.sleep(0.5)
    return False


def restart_supernode(deployment: LocalDeployment, node, timeout: float = 600):
    """Start ``node`` again with its key; the SuperLink refuses it until it has marked
    the old process offline (heartbeat window), so try again until it joins."""
    deadline = time.monotonic() + timeout
    while True:
        again = deployment.start_supernode(node.index, node.key)
        joined = again.proc.wait_for(r"SuperNode ID: \d+|Failed to activate", timeout=180)
        if joined and "SuperNode ID" in joined.group(0):
            deployment.wait_joined(again)
            return again
        again.proc.stop()
        assert time.monotonic() < deadline, again.proc.text()[-2000:]
        time.sleep(10)


@pytest.mark.slow
def test_a_lost_node_rejoins_and_a_node_that_never_returns_ends_the_run(tmp_path, embedded_assets):
    """The guide's two-node federation (minimums 2), personal adapters on:

    - run "rejoin": node 1 is killed as round 2's train message reaches it. Round 2 is
      skipped; before evaluating, the server waits for two nodes and says which partition
      is missing; node 1, restarted with the same key once the SuperLink has marked it
      offline, joins under its old id and trains in round 3, its personal state reloaded
      from the snapshot it wrote after round 1;
    - both runs with a warm worker per node (``worker-idle-s``, the deployment default):
      node 0 keeps one worker for both runs, node 1's dies with it and its successor
      starts its own;
    - run "lost": node 1 is killed in round 1 and never comes back: the run ends by
      itself after ``node-wait-timeout``, failed, naming the missing partition and the
      checkpoint to continue from (round 0), which is intact.

    Waits are bounded for a loaded machine: the SuperLink's heartbeat window is about a
    minute, the node wait in "lost" starts only once it has passed, so it may be short.
    """
    deployment = LocalDeployment(
        app_dir=ROOT,
        root=tmp_path / "deploy",
        num_supernodes=2,
        num_partitions=NUM_PARTITIONS,
        run_config=small_run(
            embedded_assets,
            **{
                "round-timeout": 900.0,
                "fraction-train": 1.0,
                "personal-adapters": True,
                "personal-unimodal": True,  # every node has personal state to reload
            },
        ),
        timeout=2400,
    )
    outputs = tmp_path / "outputs"
    train = "Receiving: train message"
    try:
        deployment.start()
        victim = deployment.supernodes[1]
        deployment.start_run("rejoin", outputs, {"num-server-rounds": 3})
        assert wait_for_count(victim.proc, train, 2, timeout=1200), "no round 2"
        deployment.kill_supernode(1)
        waiting = deployment.run_proc.wait_for(r"waiting for nodes after train round 2: .*", 900)
        assert waiting, deployment.run_proc.text()[-3000:]
        back = restart_supernode(deployment, victim)
        rejoin = deployment.wait_run("rejoin", outputs)

        trained = count_in_log(back.proc, train)
        deployment.start_run("lost", outputs, {"num-server-rounds": 2, "node-wait-timeout": 30.0})
        assert wait_for_count(back.proc, train, trained + 1, timeout=1200), "no round 1"
        back.proc.kill()
        lost = deployment.wait_run("lost", outputs)
        lost_log = deployment.run_proc.text()
    finally:
        deployment.stop()
    assert no_process_left(deployment)

    # rejoin: the wait said who was missing, the node came back under its old id ...
    assert rejoin["status"] == "completed", rejoin.get("error")
    assert "1 connected, 2 needed (" in waiting.group(0), waiting.group(0)
    assert "partitions not connected: 1;" in waiting.group(0), waiting.group(0)
    assert back.node_id == victim.node_id
    rows = [json.loads(x) for x in (outputs / "rejoin" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["skipped"] is True and str(victim.node_id) in rows[2]["dropped"]
    # ... and trained again in round 3 from the state it saved after round 1
    assert set(rows[3]["weights"]) == {"0", "1"} and rows[3]["skipped"] is False
    assert "restored client state after round 1" in back.proc.text()
    # the nodes ran with a warm worker (the deployment default): node 0 one for both runs
    # (one FAB: a file changed in the app between the runs makes a new app, a new worker)
    assert deployment.supernodes[0].proc.text().count("started node worker") == 1
    assert back.proc.text().count("started node worker") == 1

    # lost: the run ended by itself, failed, with one line that says how to go on
    assert lost["status"] == "failed"
    error = lost["error"]
    assert "\n" not in error and error.startswith("NodeWaitTimeout: waited ")
    assert "(node-wait-timeout) for nodes after train round 1: 1 connected, 2 needed" in error
    assert "partitions not connected: 1" in error
    assert error.endswith(
        f"Round 0 is the last complete round, checkpointed in {outputs / 'lost'}: once the "
        f"nodes are back, continue with -c 'resume-from=\"{outputs / 'lost'}\"'"
    )
    assert f"run failed: {error.split(': ', 1)[1]}" in lost_log
    latest = json.loads((outputs / "lost" / "checkpoint" / "latest.json").read_text())
    assert latest["round"] == 0
    assert (outputs / "lost" / "checkpoint" / latest["tensors"]).is_file()
    assert report(lost, outputs / "lost", None) == 1  # the launcher's exit code


def test_cli_refuses_a_bad_run_config_before_starting_anything(tmp_path, capsys):
    code = main(
        [
            "--app-dir",
            str(ROOT),
            "--root",
            str(tmp_path / "deploy"),
            "--output-dir",
            str(tmp_path / "outputs"),
            "-c",
            "alhpa=0.3",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "RUN FAILED" in err and "unknown run-config key 'alhpa'" in err
    assert not (tmp_path / "deploy").exists() and "logs:" not in err  # nothing to look at
