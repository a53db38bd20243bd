"""Semantic non-IID partition: k-means pseudo-labels, Dirichlet skew via Flower Datasets,
missing-modality assignment, local test splits, determinism, JSON and problem reports."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from rcsr_flower.data.partition import (
    ClientPartition,
    Partition,
    assign_modalities,
    make_partition,
    semantic_clusters,
    split_by_label,
    split_iid,
)

NUM_CLUSTERS = 20
NUM_ITEMS = 2000


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """20 well-separated Gaussian clusters in 32-D (a stand-in for caption embeddings)."""
    rng = np.random.default_rng(123)
    centers = rng.normal(size=(NUM_CLUSTERS, 32)) * 10
    labels = rng.integers(0, NUM_CLUSTERS, NUM_ITEMS)
    return (centers[labels] + rng.normal(size=(NUM_ITEMS, 32))).astype(np.float32), labels


def _mean_top_share(splits: list[list[int]], labels: np.ndarray) -> float:
    shares = [np.bincount(labels[s]).max() / len(s) for s in splits if len(s)]
    return float(np.mean(shares))


def _all_items(p: Partition) -> list[int]:
    return sorted(i for c in p.clients for i in (*c.train, *c.test))


# ---- clustering and skew ----------------------------------------------------------------------


def test_semantic_clusters_recovers_separated_clusters(blobs):
    emb, truth = blobs
    labels = semantic_clusters(emb, NUM_CLUSTERS, seed=0)
    assert labels.shape == (NUM_ITEMS,) and labels.dtype == np.int64
    assert adjusted_rand_score(truth, labels) > 0.99
    assert np.array_equal(labels, semantic_clusters(emb, NUM_CLUSTERS, seed=0))


def test_semantic_clusters_clamps_without_warnings():
    rng = np.random.default_rng(0)
    few = rng.normal(size=(5, 8))
    dup = np.repeat(rng.normal(size=(3, 8)), 4, axis=0)  # 12 rows, 3 distinct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(np.unique(semantic_clusters(few, 50, seed=0))) <= 5
        assert len(np.unique(semantic_clusters(dup, 50, seed=0))) == 3
        assert semantic_clusters(np.ones((4, 3)), 50, seed=0).tolist() == [0, 0, 0, 0]


def test_dirichlet_skew_visible_and_large_alpha_close_to_iid(blobs):
    _, truth = blobs
    iid = _mean_top_share(split_iid(NUM_ITEMS, 10, seed=0), truth)
    skewed = _mean_top_share(split_by_label(truth, 10, alpha=0.1, seed=0), truth)
    flat = _mean_top_share(split_by_label(truth, 10, alpha=100.0, seed=0), truth)
    assert iid < 0.12  # ~1/20 plus sampling noise
    assert skewed > 0.25 and skewed > 3 * iid  # ~0.34-0.45 over seeds 0-4
    assert abs(flat - iid) < 0.04
    for split in (split_by_label(truth, 10, 0.1, 0), split_iid(NUM_ITEMS, 10, 0)):
        assert sorted(i for s in split for i in s) == list(range(NUM_ITEMS))


def test_make_partition_dirichlet_end_to_end(blobs):
    emb, truth = blobs
    p = make_partition(emb, NUM_ITEMS, 10, num_clusters=NUM_CLUSTERS, alpha=0.1, seed=0)
    q = make_partition(emb, NUM_ITEMS, 10, partitioning="iid", seed=0)
    assert p.cluster_labels is not None and len(p.cluster_labels) == NUM_ITEMS
    assert adjusted_rand_score(truth, p.cluster_labels) > 0.99
    assert q.cluster_labels is None
    labels = np.asarray(p.cluster_labels)
    groups = lambda part: [[*c.train, *c.test] for c in part.clients]  # noqa: E731
    assert _mean_top_share(groups(p), labels) > 3 * _mean_top_share(groups(q), labels)
    assert p.settings["num_clusters_used"] == NUM_CLUSTERS
    assert p.settings["seed"] == 0 and p.settings["alpha"] == 0.1
    sizes = [c.size for c in q.clients]
    assert max(sizes) - min(sizes) <= 1
    table = p.summary()
    assert "dirichlet" in table and "top cluster" in table and len(table.splitlines()) == 13


# ---- modalities --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "rate", "expected"),  # (paired, image-only, text-only); the odd one is image-only
    [
        (10, 0.5, (5, 3, 2)),
        (5, 0.5, (2, 2, 1)),  # 2.5 rounds half up to 3 missing
        (4, 0.25, (3, 1, 0)),
        (10, 0.3, (7, 2, 1)),
        (10, 0.0, (10, 0, 0)),
        (10, 1.0, (0, 5, 5)),
        (7, 1.0, (0, 4, 3)),
        (1, 0.5, (0, 1, 0)),
    ],
)
def test_modality_counts(n, rate, expected):
    mods = assign_modalities(n, rate, seed=0)
    assert len(mods) == n
    counts = tuple(mods.count(m) for m in ("paired", "image-only", "text-only"))
    assert counts == expected


def test_modality_assignment_depends_on_seed():
    runs = {tuple(assign_modalities(10, 0.5, seed=s)) for s in range(6)}
    assert len(runs) > 1
    assert assign_modalities(10, 0.5, seed=3) == assign_modalities(10, 0.5, seed=3)


# ---- determinism, JSON, coverage, local test ---------------------------------------------------


def test_deterministic_json_and_round_trip(blobs, tmp_path):
    emb, _ = blobs
    kw = {"num_clusters": NUM_CLUSTERS, "seed": 7}
    a = make_partition(emb, NUM_ITEMS, 8, **kw)
    b = make_partition(emb, NUM_ITEMS, 8, **kw)
    c = make_partition(emb, NUM_ITEMS, 8, num_clusters=NUM_CLUSTERS, seed=8)
    a.to_json(tmp_path / "a.json")
    b.to_json(tmp_path / "out" / "b.json")  # parent directory is created
    c.to_json(tmp_path / "c.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "out" / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "c.json", "out"]  # no tmp
    back = Partition.from_json(tmp_path / "a.json")
    assert back == a
    back.to_json(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    text = (tmp_path / "a.json").read_text()
    assert len(text.splitlines()) == 8 + 8  # one line per client: readable, diffable
    assert json.loads(text)["clients"][3]["client_id"] == 3


@pytest.mark.parametrize("partitioning", ["dirichlet", "iid"])
def test_every_item_once_and_local_test_fraction(blobs, partitioning):
    emb, _ = blobs
    p = make_partition(emb, NUM_ITEMS, 12, partitioning=partitioning, local_test_fraction=0.2)
    assert _all_items(p) == list(range(NUM_ITEMS))
    for c in p.clients:
        assert not set(c.train) & set(c.test)
        assert list(c.train) == sorted(c.train) and list(c.test) == sorted(c.test)
        n = c.size
        if n >= 2:
            assert len(c.test) == min(n - 1, max(1, int(np.floor(0.2 * n + 0.5))))
        else:
            assert len(c.test) == 0
    assert {c.modality for c in p.clients} == {"paired", "image-only", "text-only"}


def test_local_test_small_clients_and_zero_fraction():
    p = make_partition(None, 7, 3, partitioning="iid", local_test_fraction=0.1)
    assert [len(c.test) for c in p.clients] == [1, 1, 1]  # >= 1 when a client has >= 2 items
    q = make_partition(None, 7, 3, partitioning="iid", local_test_fraction=0.0)
    assert all(c.test == () for c in q.clients)
    assert q.problems(batch_size=1) == []  # empty test split intended: not a problem


# ---- empty and small clients -------------------------------------------------------------------


def test_more_partitions_than_items_no_crash(blobs):
    emb, _ = blobs
    p = make_partition(emb[:5], 5, 12, seed=0)
    assert len(p.clients) == 12 and _all_items(p) == [0, 1, 2, 3, 4]
    empty = [c.client_id for c in p.clients if c.size == 0]
    assert len(empty) >= 7
    problems = p.problems(batch_size=2)
    for cid in empty:
        assert any(msg.startswith(f"client {cid} (") and "no data" in msg for msg in problems)
    q = make_partition(None, 3, 5, partitioning="iid")
    assert [c.size for c in q.clients] == [1, 1, 1, 0, 0]
    assert make_partition(None, 0, 3, partitioning="iid").problems(1)[0].startswith("client 0")
    z = make_partition(np.zeros((0, 4)), 0, 2)
    assert all(c.size == 0 for c in z.clients) and z.cluster_labels == ()


def test_extreme_alpha_and_small_clients_reported(blobs):
    emb, truth = blobs
    splits = split_by_label(truth[:60] % 3, 10, alpha=1e-3, seed=0)  # 3 labels, 10 clients
    assert sum(len(s) for s in splits) == 60 and any(len(s) == 0 for s in splits)
    p = make_partition(emb[:60], 60, 10, num_clusters=3, alpha=1e-3, seed=1)
    problems = p.problems(batch_size=4)
    for c in p.clients:
        named = [m for m in problems if m.startswith(f"client {c.client_id} (")]
        if c.size == 0:
            assert named and "no data" in named[0]
        elif 0 < len(c.train) < 4:
            assert any("fewer than one batch (batch-size 4)" in m for m in named)
        if c.size == 1:
            assert any("empty local test split" in m for m in named)
    big = make_partition(None, 40, 2, partitioning="iid", seed=0)
    assert any("fewer than one batch (batch-size 64)" in m for m in big.problems(64))
    with pytest.raises(ValueError, match="batch-size"):
        big.problems(0)


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"alpha": 0.0}, "alpha must be"),
        ({"alpha": -1.0}, "alpha must be"),
        ({"missing_rate": 1.5}, r"missing-rate must be a number in \[0, 1\]"),
        ({"missing_rate": -0.1}, "missing-rate"),
        ({"local_test_fraction": 1.0}, r"local-test-fraction must be a number in \[0, 1\)"),
        ({"num_partitions": 0}, "num_partitions must be an integer >= 1"),
        ({"partitioning": "pathological"}, "partitioning must be one of 'dirichlet', 'iid'"),
        ({"num_clusters": 0}, "partition-clusters must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"num_items": 11}, "embeddings have 10 rows but num_items is 11"),
        ({"embeddings": None}, "needs the caption embeddings"),
    ],
)
def test_argument_validation(kwargs, pattern):
    args = {"embeddings": np.ones((10, 4)), "num_items": 10, "num_partitions": 3, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        make_partition(**args)


def test_from_json_rejects_malformed_files(tmp_path):
    good = make_partition(None, 6, 2, partitioning="iid")
    path = tmp_path / "p.json"
    good.to_json(path)
    data = json.loads(path.read_text())

    def check(mutate, pattern):
        broken = json.loads(json.dumps(data))
        mutate(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=pattern) as err:
            Partition.from_json(path)
        assert str(path) in str(err.value)

    check(lambda d: d.pop("clients"), "'clients' is missing")
    check(lambda d: d["clients"][1].update(modality="audio-only"), "modality 'audio-only'")
    check(lambda d: d["clients"][1]["train"].append(99), r"clients\[1\].train must be")
    check(lambda d: d["clients"][1]["train"].__setitem__(0, d["clients"][0]["train"][0]), "twice")
    check(lambda d: d["clients"][1].update(num_test=9), "num_test is 9")
    check(lambda d: d["clients"][0].update(client_id=5), "client_id 5, expected 0")
    check(lambda d: d.update(version=99), "version")
    path.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        Partition.from_json(path)
    with pytest.raises(FileNotFoundError):
        Partition.from_json(tmp_path / "none.json")
    assert isinstance(good.clients[0], ClientPartition)


# ---- the caption embeddings behind the semantic partition ---------------------------------------


def test_partition_embeddings_use_all_cores_and_match_one_thread(
    backbone, embedded_assets, monkeypatch
):
    """The one-off partition embedding runs with every core (a Ray actor has one thread),
    restores the caller's thread count, and gives the same bits as one thread, so the
    partition cannot depend on how many cores computed it."""
    import torch

    from rcsr_flower import federation
    from rcsr_flower.backbones import clip
    from rcsr_flower.backbones.clip import available_cores, torch_threads
    from rcsr_flower.data.datasets import open_dataset

    items = open_dataset(embedded_assets.corpus_json, split="train").subset(range(300))
    seen: list[int] = []
    original = backbone.embed_caption_lists

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, "embed_caption_lists", spy)
    with torch_threads(1):
        federation.caption_embeddings(backbone, items)
        assert torch.get_num_threads() == 1
        found = {}
        for cores in (2, 1):  # fixed counts: the same comparison on any machine
            monkeypatch.setattr(clip, "available_cores", lambda cores=cores: cores)
            found[cores] = federation.caption_embeddings(backbone, items)
    assert seen == [available_cores(), 2, 1]
    np.testing.assert_array_equal(found[2], found[1])


# ---- content groups and equal sizes (§1, revised) ------------------------------------------


def test_equal_size_dirichlet_keeps_the_skew_and_equalises_the_sizes(blobs):
    from rcsr_flower.data.partition import split_by_label_equal

    _, labels = blobs
    plain = split_by_label(labels, 10, 0.1, seed=0)
    equal = split_by_label_equal(labels, 10, 0.1, seed=0)
    assert sorted(i for s in equal for i in s) == list(range(NUM_ITEMS))  # each item once
    assert {len(s) for s in equal} == {NUM_ITEMS // 10}
    assert max(map(len, plain)) > 1.5 * min(map(len, plain))  # the plain draw is uneven
    iid = split_iid(NUM_ITEMS, 10, seed=0)
    assert _mean_top_share(equal, labels) > 2 * _mean_top_share(iid, labels)
    assert equal == split_by_label_equal(labels, 10, 0.1, seed=0)  # deterministic
    assert equal != split_by_label_equal(labels, 10, 0.1, seed=1)
    # uneven totals: the first n % N clients take one more
    assert [len(s) for s in split_by_label_equal(labels[:23], 5, 0.5, seed=0)] == [5, 5, 5, 4, 4]


def test_content_labels_partition_over_a_recorded_attribute():
    from rcsr_flower.data.partition import content_labels

    attrs = [{"color": c, "shape": "star"} for c in ("red", "blue", "red", "green")] * 25
    labels = content_labels(attrs, "color")
    assert labels.tolist()[:4] == [2, 0, 2, 1]  # sorted names: blue, green, red
    p = make_partition(None, 100, 4, labels=labels, alpha=0.1, missing_rate=0.0, seed=0)
    assert p.settings["labels"] == "given" and list(p.cluster_labels) == labels.tolist()
    eq = make_partition(None, 100, 4, labels=labels, missing_rate=0.0, equal_sizes=True)
    assert {c.size for c in eq.clients} == {25} and eq.settings["equal_sizes"] is True
    with pytest.raises(ValueError, match=r"partition-by = 'texture'.*records \['color', 'shape'\]"):
        content_labels(attrs, "texture")
    with pytest.raises(ValueError, match="records none"):
        content_labels([None], "color")


def test_partition_by_a_content_attribute_through_the_run_config(embedded_assets):
    """The embedded corpus records each item's attributes: ``partition-by = "color"`` splits
    by object colour without embedding a caption; an unknown attribute is a ConfigError."""
    from rcsr_flower import federation
    from rcsr_flower.config import ConfigError, RunConfig

    cfg = RunConfig(
        partition_by="color",
        partition_sizes="equal",
        train_max_items=400,
        local_test_items="0",
        missing_rate=0.0,
        seed=12345,
    )
    train = federation.open_split(cfg, "train")
    part = federation.load_partition(cfg, None, 8, train)  # no backbone needed
    colors = [train.attributes(i)["color"] for i in range(len(train))]
    assert {c.size for c in part.clients} == {50}
    top = [
        max(np.unique([colors[i] for i in c.train], return_counts=True)[1]) / len(c.train)
        for c in part.clients
    ]
    assert np.mean(top) > 0.5  # alpha 0.1 over 8 colours: one or two colours per client
    with pytest.raises(ConfigError, match="partition-by = 'flavour'"):
        federation.load_partition(cfg.replace(partition_by="flavour"), None, 8, train)


def test_top_up_local_tests_draws_unused_items_in_each_clients_mix():
    """``local-test-items``: every client's local test split reaches the size, from items
    no client holds, in the client's own proportions of content groups; training splits
    are untouched and no pool item is drawn twice."""
    from collections import Counter

    from rcsr_flower.data.partition import top_up_local_tests

    labels = np.repeat(np.arange(4), 50)  # 200 items, 4 groups
    part = make_partition(
        None, 200, 5, labels=labels, alpha=0.1, missing_rate=0.4, seed=3, equal_sizes=True
    )
    pool = list(range(200, 1000))
    pool_labels = [v % 5 if v % 5 < 4 else -1 for v in pool]  # -1: a group no client has
    up = top_up_local_tests(part, 30, pool, pool_labels, seed=3)
    assert up.settings["local_test_items"] == 30 and up.settings["pool_items"] == 1000
    drawn: list[int] = []
    for before, after in zip(part.clients, up.clients, strict=True):
        assert after.train == before.train and after.modality == before.modality
        assert set(before.test) <= set(after.test) and len(after.test) == 30
        extra = sorted(set(after.test) - set(before.test))
        drawn += extra
        mix = Counter(int(labels[i]) for i in before.train)
        got = Counter(pool_labels[v - 200] for v in extra)
        assert set(got) <= set(mix)  # only the client's own groups
        for group, k in mix.items():  # largest remainder: within one item of the share
            assert abs(got[group] - len(extra) * k / len(before.train)) < 1
    assert len(drawn) == len(set(drawn))
    assert up == top_up_local_tests(part, 30, pool, pool_labels, seed=3)  # deterministic
    # IID: uniform draws; a client already at the size keeps its split
    iid = make_partition(None, 200, 4, partitioning="iid", missing_rate=0.0, seed=0)
    assert [len(c.test) for c in top_up_local_tests(iid, 25, pool).clients] == [25] * 4
    assert top_up_local_tests(iid, 3, pool).clients == iid.clients
    with pytest.raises(ValueError, match="lower local-test-items or train-max-items"):
        top_up_local_tests(part, 30, pool[:40], pool_labels[:40], seed=3)
    with pytest.raises(ValueError, match="past the partition's 200"):
        top_up_local_tests(part, 30, [5, 6])


def test_local_test_items_through_the_run_config(embedded_assets, tmp_path):
    """The run config's ``local-test-items`` tops up the local test splits from the
    embedded corpus's training items past ``train-max-items``, in each client's colours;
    the partition file round-trips and the client data reads those items past the cap."""
    from rcsr_flower import federation
    from rcsr_flower.config import ConfigError, RunConfig
    from rcsr_flower.data.partition import Partition

    base = RunConfig(
        partition_by="color",
        partition_sizes="equal",
        train_max_items=400,
        local_test_items="0",
        seed=54321,
    )
    cfg = base.replace(local_test_items="40")
    train = federation.open_split(cfg, "train")
    full = federation.open_split(cfg, "train", capped=False)
    plain = federation.load_partition(base, None, 8, train)
    part = federation.load_partition(cfg, None, 8, train)
    assert federation.partition_key(cfg, "x", 8) != federation.partition_key(base, "x", 8)
    for before, after in zip(plain.clients, part.clients, strict=True):
        assert after.train == before.train and len(after.test) == 40
        own = {train.attributes(i)["color"] for i in before.train}
        assert {full.attributes(i)["color"] for i in after.test} <= own
        assert max(after.test) >= len(train)  # drawn past the cap
    part.to_json(tmp_path / "p.json")
    assert Partition.from_json(tmp_path / "p.json") == part
    with pytest.raises(ConfigError, match="k-means clusters"):
        federation.load_partition(cfg.replace(partition_by="kmeans"), None, 8, train)
    with pytest.raises(ConfigError, match="train-max-items"):
        federation.load_partition(cfg.replace(train_max_items=0), None, 8)
    # "auto": 50 on the embedded benchmark, nothing on other data (k-means there)
    assert RunConfig().local_test_size == 50 and base.local_test_size == 0
    assert RunConfig(dataset="/data/flickr30k.json").local_test_size == 0
    assert RunConfig.from_flower({"local-test-items": 7}).local_test_size == 7
    with pytest.raises(ConfigError, match="'auto' or a number of items"):
        RunConfig(local_test_items="many").validate()
