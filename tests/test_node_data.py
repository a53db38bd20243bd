"""Deployment: a SuperNode's node_config says where its data is (copy or own shard).

The tests go through ``rcsr_flower.client.handlers.setup(run_config, node_config)``, what the
ClientApp calls with ``context.run_config`` and ``context.node_config``, or through
``NodeConfig.from_flower``, its one reader of node_config; node_config strings are parsed
by Flower's own ``--node-config`` parser.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.config import parse_config_args

from rcsr_flower.client.handlers import PERSONAL_KEY, ClientStateStore, light_query, setup
from rcsr_flower.config import WORKER_IDLE_KEY, ConfigError, NodeConfig, RunConfig
from rcsr_flower.data.datasets import KarpathyDataset, open_dataset
from rcsr_flower.data.partition import assign_modalities, shard_partition
from rcsr_flower.federation import (
    NodeData,
    load_partition,
    node_data,
    partition_mismatches,
    reported_partition,
)

WORDS = ["red", "green", "blue", "circle", "square", "star", "small", "large", "left", "right"]


def write_flickr(root: Path, n_train: int = 40, n_test: int = 6, seed: int = 0) -> Path:
    """A Flickr30K-layout fixture: dataset_flickr30k.json + a separate image folder."""
    g = torch.Generator().manual_seed(seed)
    images = root / "flickr30k-images"
    images.mkdir(parents=True)
    entries = []
    for k in range(n_train + n_test):
        pixels = torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8).numpy()
        PIL.Image.fromarray(pixels).save(images / f"{k}.jpg", quality=90)
        words = torch.randint(0, len(WORDS), (5, 4), generator=g).tolist()
        entries.append(
            {
                "filename": f"{k}.jpg",
                "imgid": k,
                "split": "train" if k < n_train else "test",
                "sentences": [{"raw": " ".join(WORDS[w] for w in ws)} for ws in words],
            }
        )
    ann = root / "annotations"
    ann.mkdir()
    path = ann / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path


def run_config(embedded_assets, cache_dir: Path, **extra) -> dict:
    """The server's run config: its dataset paths do not exist on the nodes' machines."""
    cfg = RunConfig(
        model_name=str(embedded_assets.backbone_dir),
        dataset="/nonexistent/server/dataset_flickr30k.json",
        data_dir="/nonexistent/server/flickr30k-images",
        cache_dir=str(cache_dir),
        partition_clusters=4,
        batch_size=8,
    ).to_flower()
    return {**cfg, **extra}


def node_config(line: str) -> dict:
    return parse_config_args([line])  # exactly what flower-supernode --node-config does


@pytest.fixture
def flickr_copy(tmp_path):
    return write_flickr(tmp_path / "site-a")


def test_node_config_paths_replace_the_run_configs(
    embedded_assets, backbone, tmp_path, flickr_copy
):
    images = flickr_copy.parent.parent / "flickr30k-images"
    nc = node_config(f"partition-id=2 num-partitions=3 dataset='{flickr_copy}' data-dir='{images}'")
    rc = run_config(embedded_assets, tmp_path / "cache")
    node = setup(rc, nc)
    assert node.cfg.dataset == str(flickr_copy) and node.cfg.data_dir == str(images)
    # the node's share of the semantic partition of *its* copy
    train = open_dataset(flickr_copy, "train", image_root=images)
    partition = load_partition(node.cfg, backbone, 3, train)
    share = partition.clients[2]
    assert node.data.modality == share.modality == "paired"
    assert len(node.data.train) == len(share.train) and len(node.data.test) == len(share.test)
    assert node.data.test.captions[0] == train.captions(share.test[0])
    expected = backbone.preprocess([train.image(share.test[0])])
    assert torch.equal(node.data.test.pixels[:1], expected)
    # the server with its own partition sees no mismatch in what the nodes report
    report = {"node_id": 7, **node.describe()}
    assert report["shard"] == 0
    assert partition_mismatches(partition, [report]) == []
    wrong = {**report, "num-train": report["num-train"] + 1}
    (line,) = partition_mismatches(partition, [wrong])
    assert "node 7 (partition 2)" in line and "differs from the server's" in line


def test_a_copy_at_another_path_gives_the_same_share(embedded_assets, tmp_path, flickr_copy):
    other = tmp_path / "site-b"
    shutil.copytree(flickr_copy.parent.parent, other)
    rc = run_config(embedded_assets, tmp_path / "cache")
    shares = []
    for root in (flickr_copy.parent.parent, other):
        nc = node_config(
            f"partition-id=0 num-partitions=2 dataset='{root}/annotations/dataset_flickr30k.json'"
            f" data-dir='{root}/flickr30k-images'"
        )
        data = setup(rc, nc).data
        shares.append((data.modality, data.train.captions, data.test.captions))
    assert shares[0] == shares[1]


def test_a_shard_node_trains_on_its_whole_train_split(embedded_assets, tmp_path, flickr_copy):
    rc = run_config(embedded_assets, tmp_path / "cache", **{"local-test-fraction": 0.25})
    nc = node_config(f"partition-id=2 num-partitions=4 dataset='{flickr_copy.parent}' shard=true")
    # a dataset directory holding one dataset*.json is Karpathy; images: data-dir
    nc["data-dir"] = str(flickr_copy.parent.parent / "flickr30k-images")
    node = setup(rc, nc)
    assert node.shard and node.describe()["shard"] == 1
    assert len(node.data.train) + len(node.data.test) == 40  # every train item, no others
    assert len(node.data.test) == 10  # local-test-fraction 0.25
    assert node.data.modality == assign_modalities(4, 0.5, 0)[2]
    report = reported_partition([{"node_id": 3, **node.describe()}])
    assert report["clients"][0]["num_train"] == 30 and report["clients"][0]["shard"]
    # a node may say which modality it has
    forced = setup(rc, {**nc, "modality": "text-only"})
    assert forced.data.modality == "text-only" and forced.data.train.pixels is None


def test_a_client_decodes_only_the_images_it_uses(
    embedded_assets, tmp_path, flickr_copy, monkeypatch
):
    decoded: list[str] = []
    real = KarpathyDataset._image

    def spy(self, i):
        decoded.append(self._relpaths[i])
        return real(self, i)

    monkeypatch.setattr(KarpathyDataset, "_image", spy)
    rc = run_config(embedded_assets, tmp_path / "cache", **{"local-test-fraction": 0.25})
    images = flickr_copy.parent.parent / "flickr30k-images"
    nc = node_config(
        f"partition-id=0 num-partitions=2 dataset='{flickr_copy}' data-dir='{images}' "
        "shard=true modality='text-only'"
    )
    node = setup(rc, nc)
    # a text-only client decodes its local test images (evaluation needs both), no train image
    assert node.data.train.pixels is None
    share = shard_partition(40, 0, 2, local_test_fraction=0.25, modality="text-only")
    assert sorted(decoded) == sorted(f"{i}.jpg" for i in share.test)  # train items 0..39


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "dataset=5",
            "node_config 'dataset' = 5 must be a string: quote it, "
            "--node-config \"... dataset='5'\"",
        ),
        (
            "dataset='/d.json' modality='text-only'",
            "'modality' = 'text-only' is allowed only with shard=true",
        ),
        ("dataset='/d.json' shard=true modality='audio'", "allowed values are 'paired', "),
        ("shard=true", "shard=true needs the node's own dataset: add dataset="),
        ("dataset='/d.json' shard='yes'", "'shard' = 'yes' must be true or false: shard=true"),
        (
            "dataset-format='coco'",
            "node_config 'dataset-format' = 'coco': allowed values are 'auto', 'karpathy'",
        ),
        ("model-name=' '", "node_config 'model-name' is empty"),
        ("datset='/d.json'", "unknown node_config key 'datset' (did you mean dataset,"),
        ("partition_id=0", "unknown node_config key 'partition_id' (did you mean partition-id"),
        ("lr=0.1", "'lr' is a run-config key, the same for every node (flwr run -c"),
        ("worker-idle-s=-5", "'worker-idle-s' = -5.0 is out of range: allowed [0, inf); set it"),
        ("worker-idle-s='600'", "'worker-idle-s' = '600' must be a number: set it to how long"),
    ],
)
def test_bad_node_config_fails_with_one_line(line, message):
    """Each error names the key, the value and the fix, before anything is loaded."""
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        setup(RunConfig().to_flower(), node_config(f"partition-id=0 num-partitions=2 {line}"))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("num-partitions=4", "node_config has no 'partition-id': start each SuperNode with"),
        ("partition-id=0", "node_config has no 'num-partitions'"),
        ("partition-id='0' num-partitions=4", "'partition-id' = '0' must be an integer"),
        ("partition-id=true num-partitions=4", "'partition-id' = True must be an integer"),
        ("partition-id=1.0 num-partitions=4", "'partition-id' = 1.0 must be an integer"),
        ("partition-id=-1 num-partitions=4", "'partition-id' = -1 is out of range: allowed [0,"),
        ("partition-id=0 num-partitions=0", "'num-partitions' = 0 is out of range: allowed [1,"),
        (
            "partition-id=4 num-partitions=4",
            "'partition-id' = 4 is out of range: allowed [0, 4) (num-partitions = 4)",
        ),
    ],
)
def test_a_node_without_a_valid_partition_fails_with_one_line(line, message):
    run = RunConfig().to_flower()
    size = ConfigRecord({"kind": "size"})
    for read in (lambda nc: setup(run, nc), lambda nc: light_query(run, nc, size)):
        with pytest.raises(ConfigError, match=re.escape(message)):
            read(node_config(line))


@pytest.mark.parametrize(
    ("line", "changes", "shard", "modality"),
    [
        ("", {}, False, None),
        ("worker-idle-s=600", {}, False, None),
        ("dataset='/site/d.json'", {"dataset": "/site/d.json", "data_dir": ""}, False, None),
        (
            "dataset='/site/d.json' data-dir='/site/img' cache-dir='/c' model-name='/m'",
            {
                "dataset": "/site/d.json",
                "data_dir": "/site/img",
                "cache_dir": "/c",
                "model_name": "/m",
            },
            False,
            None,
        ),
        ("data-dir='/site/img'", {"data_dir": "/site/img"}, False, None),
        (
            "dataset='/hf' dataset-format='hf' image-column='jpg' caption-column='s' "
            "split-column='which'",
            {
                "dataset": "/hf",
                "data_dir": "",
                "dataset_format": "hf",
                "image_column": "jpg",
                "caption_column": "s",
                "split_column": "which",
            },
            False,
            None,
        ),
        ("dataset='/site' shard=true", {"dataset": "/site", "data_dir": ""}, True, None),
        (
            "dataset='/site' shard=true modality='image-only'",
            {"dataset": "/site", "data_dir": ""},
            True,
            "image-only",
        ),
        ("dataset='/site' shard=false", {"dataset": "/site", "data_dir": ""}, False, None),
    ],
)
def test_a_valid_node_config_gives_the_run_config_with_its_locations(
    line, changes, shard, modality
):
    cfg = RunConfig(dataset="/server/dataset_coco.json", data_dir="/server/coco")
    node = NodeConfig.from_flower(node_config(f"partition-id=1 num-partitions=3 {line}"))
    assert (node.partition_id, node.num_partitions) == (1, 3)
    source = node_data(cfg, node)
    assert source == NodeData(cfg.replace(**changes), shard, modality)
    if not changes:
        assert source.cfg is cfg


def test_worker_idle_seconds_are_a_number():
    nc = {"partition-id": 0, "num-partitions": 1}
    assert NodeConfig.from_flower(nc).worker_idle_s == 0.0
    idle = NodeConfig.from_flower({**nc, WORKER_IDLE_KEY: 90}).worker_idle_s
    assert idle == 90.0 and isinstance(idle, float)


def test_a_node_with_its_own_cache_dir_releases_the_state_it_kept_there(tmp_path):
    """Resume snapshots live under the node's ``cache-dir`` (``client-state/``), so the
    release at the end of the run deletes them there, not under the server's."""
    key = "0123456789abcdef" * 2
    run = RunConfig(cache_dir=str(tmp_path / "server-cache")).to_flower()
    nc = node_config(f"partition-id=1 num-partitions=2 cache-dir='{tmp_path / 'node-cache'}'")
    kept = tmp_path / "node-cache" / "client-state" / key / "partition-1"
    store = ClientStateStore(kept.parent.parent, key, 1)
    store.save(1, RecordDict({PERSONAL_KEY: ArrayRecord({"w": torch.zeros(2)})}))
    assert store.dir == kept and kept.exists()
    released = light_query(run, nc, ConfigRecord({"kind": "release-state", "state-key": key}))
    assert released == {"released": 1} and not kept.parent.exists()


def test_hf_dataset_with_its_own_column_names_on_a_node(embedded_assets, tmp_path):
    """A Hugging Face dataset saved locally (images embedded, a caption list, a split
    column), named by the node and read with the run config's column names."""
    import datasets

    g = torch.Generator().manual_seed(1)
    n = 12
    rows = {
        "jpg": [
            PIL.Image.fromarray(
                torch.randint(0, 256, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()
            )
            for _ in range(n)
        ],
        "sentences": [
            [f"{WORDS[k % 10]} {WORDS[(k + 3) % 10]}", f"a {WORDS[k % 10]}"] for k in range(n)
        ],
        "which": ["train"] * 9 + ["test"] * 3,
    }
    features = datasets.Features(
        {
            "jpg": datasets.Image(),
            "sentences": datasets.List(datasets.Value("string")),
            "which": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "hf")
    rc = run_config(
        embedded_assets,
        tmp_path / "cache",
        **{
            "image-column": "jpg",
            "caption-column": "sentences",
            "split-column": "which",
            "missing-rate": 0.0,
        },
    )
    nc = node_config(f"partition-id=0 num-partitions=1 dataset='{tmp_path / 'hf'}' shard=true")
    node = setup(rc, {**nc, "dataset-format": "hf"})
    assert node.data.modality == "paired"
    assert len(node.data.train) + len(node.data.test) == 9  # the 'train' rows only
    held = sorted(node.data.train.captions + node.data.test.captions)
    assert held == sorted(rows["sentences"][:9])
    assert node.data.train.pixels.shape[1:] == (3, 64, 64)  # the tiny CLIP's 64 px


def test_a_worker_drops_least_recently_used_clients_beyond_the_cache_budget(
    embedded_assets, tmp_path, flickr_copy, monkeypatch
):
    # the memory cache alone: the node's disk cache (test_client_cache.py) is bypassed
    monkeypatch.setattr("rcsr_flower.client.data.read_client_cache", lambda path, pid: None)
    decoded: list[str] = []
    real = KarpathyDataset._image
    monkeypatch.setattr(
        KarpathyDataset, "_image", lambda self, i: decoded.append(i) or real(self, i)
    )
    images = flickr_copy.parent.parent / "flickr30k-images"
    line = f"num-partitions=2 dataset='{flickr_copy}' data-dir='{images}' shard=true"

    def load(pid: int, budget: float):
        rc = run_config(embedded_assets, tmp_path / "cache", **{"data-cache-gb": budget})
        before = len(decoded)
        data = setup(rc, node_config(f"partition-id={pid} {line}")).data
        return data, len(decoded) - before

    # a budget smaller than one client keeps only the client in use
    first, n = load(0, 0.0)
    assert n == 40  # paired: every item of its shard
    assert load(1, 0.0)[1] == 40
    again, n = load(0, 0.0)
    assert n == 40 and torch.equal(again.train.pixels, first.train.pixels)
    # room for both: a client that comes back is served from memory
    assert load(1, 1.0)[1] == 40 and load(0, 1.0)[1] == 0 and load(1, 1.0)[1] == 0
