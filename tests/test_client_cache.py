"""The node's disk cache of preprocessed client data.

In a deployment every message starts a fresh ClientApp process; the cache is what spares
each one from decoding and preprocessing the node's images again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from rcsr_flower.client import data as client_data
from rcsr_flower.client.data import (
    ClientData,
    client_cache_path,
    load_client_data,
    read_client_cache,
    write_client_cache,
)
from rcsr_flower.config import RunConfig
from rcsr_flower.federation import partition_key
from rcsr_flower.retrieval.evaluation import SplitTensors


def same(a: ClientData, b: ClientData) -> bool:
    def split_eq(x: SplitTensors, y: SplitTensors) -> bool:
        pixels = (x.pixels is None and y.pixels is None) or (
            x.pixels is not None and y.pixels is not None and torch.equal(x.pixels, y.pixels)
        )
        return pixels and x.captions == y.captions

    return (
        (a.client_id, a.modality) == (b.client_id, b.modality)
        and split_eq(a.train, b.train)
        and split_eq(a.test, b.test)
    )


def test_round_trip_keeps_a_missing_modality_missing(tmp_path):
    data = ClientData(
        3,
        "text-only",
        SplitTensors(None, [["a red square", "a square"], ["a blue circle"]]),
        SplitTensors(torch.randn(2, 3, 8, 8), [["x"], ["y é"]]),
    )
    path = tmp_path / "c.safetensors"
    write_client_cache(path, data)
    back = read_client_cache(path, 3)
    assert back is not None and same(back, data) and back.train.pixels is None
    assert read_client_cache(path, 4) is None  # another partition's file is not used
    assert read_client_cache(tmp_path / "absent.safetensors", 3) is None


def test_a_torn_file_is_ignored_not_fatal(tmp_path, caplog):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with caplog.at_level(logging.WARNING, logger="rcsr_flower.client.data"):
        assert read_client_cache(path, 0) is None
    assert "ignoring unreadable client cache" in caplog.text


def test_client_data_is_preprocessed_once_per_node(embedded_assets, backbone, monkeypatch):
    cfg = RunConfig(partitioning="iid", cache_dir=str(embedded_assets.root.parent))
    path = client_cache_path(cfg, backbone, partition_key(cfg, backbone, 20), 0)
    path.unlink(missing_ok=True)
    monkeypatch.setattr(client_data, "_DATA_CACHE", OrderedDict())
    first = load_client_data(cfg, backbone, 0, 20)
    assert path.is_file()

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("preprocessed again")

    # as in a fresh ClientApp process
    monkeypatch.setattr(client_data, "_DATA_CACHE", OrderedDict())
    monkeypatch.setattr(client_data, "preprocess_split", no_preprocessing)
    second = load_client_data(cfg, backbone, 0, 20)
    assert same(first, second) and first.train.pixels is not None


def test_data_not_remembered_stays_on_disk_only(embedded_assets, backbone, monkeypatch):
    """The query round asks every node once: a simulation worker must not keep all their
    data, only the round's participants'."""
    cfg = RunConfig(partitioning="iid", cache_dir=str(embedded_assets.root.parent))
    monkeypatch.setattr(client_data, "_DATA_CACHE", OrderedDict())
    queried = load_client_data(cfg, backbone, 1, 20, remember=False)
    assert not client_data._DATA_CACHE  # nothing kept in the process
    assert client_cache_path(cfg, backbone, partition_key(cfg, backbone, 20), 1).is_file()
    trained = load_client_data(cfg, backbone, 1, 20)  # its round: read back, then kept
    assert same(queried, trained) and len(client_data._DATA_CACHE) == 1


def test_train_max_items_caps_the_split_every_client_draws_from(
    embedded_assets, backbone, monkeypatch
):
    """``train-max-items`` cuts the training split before partitioning: the clients'
    shares add up to the cap, and the capped run has its own partition and caches."""
    from rcsr_flower.federation import load_partition, open_split

    root = str(embedded_assets.root.parent)
    full = RunConfig(partitioning="iid", cache_dir=root, local_test_items="0")
    capped = full.replace(train_max_items=400)
    assert len(open_split(capped, "train")) == 400 < len(open_split(full, "train"))
    assert len(open_split(capped, "test")) == len(open_split(full, "test"))
    assert partition_key(capped, backbone, 4) != partition_key(full, backbone, 4)
    partition = load_partition(capped, backbone, 4)
    items = [i for c in partition.clients for i in (*c.train, *c.test)]
    assert sorted(items) == list(range(400))
    monkeypatch.setattr(client_data, "_DATA_CACHE", OrderedDict())
    data = load_client_data(capped, backbone, 1, 4)
    assert len(data.train) + len(data.test) == 100
    # local-test-items: the local test split reads items past the cap, the same tensors
    # as the uncapped split's; training data unchanged
    topped = capped.replace(local_test_items="30")
    client = load_partition(topped, backbone, 4).clients[1]
    more = load_client_data(topped, backbone, 1, 4)
    assert len(more.test) == 30 and max(client.test) >= 400
    assert same(ClientData(1, more.modality, more.train, data.test), data)
    uncapped = open_split(full, "train", capped=False)
    expected = client_data.preprocess_split(backbone, uncapped.subset(client.test))
    assert torch.equal(more.test.pixels, expected.pixels)
    assert more.test.captions == expected.captions


def test_new_weights_under_the_same_model_name_get_a_new_partition_key(
    embedded_assets, tmp_path, monkeypatch
):
    """The partition embeds captions with the backbone, and the client caches and
    frozen-prefix features are keyed by the partition's key: a checkpoint directory
    rewritten in place (new weights, same ``model-name``) must not find the old ones.
    The key reads only file names, sizes and times (the launcher looks it up without
    torch); a hub id is keyed by its snapshot in the local Hugging Face cache."""
    import os
    import shutil

    from huggingface_hub import constants

    from rcsr_flower.federation import backbone_stamp

    model = tmp_path / "my-clip"
    shutil.copytree(embedded_assets.backbone_dir, model)
    cfg = RunConfig(model_name=str(model), cache_dir=str(embedded_assets.root.parent))
    before = partition_key(cfg, str(model), 4)
    assert partition_key(cfg, str(model), 4) == before  # nothing changed: same key
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # saved again: same name, new file
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert partition_key(cfg, str(model), 4) != before
    # the embedded name stands for the files in the cache, like any directory
    embedded = RunConfig(cache_dir=str(embedded_assets.root.parent))
    assert backbone_stamp("embedded", embedded.cache_dir) == backbone_stamp(
        str(embedded_assets.backbone_dir)
    )
    # a hub id: the snapshot commit the local cache's refs/main points at
    repo = tmp_path / "hub" / "models--org--clip"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    keys = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "refs" / "main").write_text(commit)
        assert backbone_stamp("org/clip") == commit
        keys.append(partition_key(cfg.replace(model_name="org/clip"), "org/clip", 4))
    assert keys[0] != keys[1]
    assert backbone_stamp("org/not-cached") is None
