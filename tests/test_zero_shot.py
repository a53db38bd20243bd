"""The frozen backbone's results remembered on disk (``zero-shot-cache``), on the real
embedded backbone and corpus: what comes back is what recomputing gives, and any change
to what it depends on is a new key."""

import copy
import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from test_client import node_for, splits  # noqa: F401

from rcsr_flower.client import training as task_module
from rcsr_flower.client.handlers import handle_evaluate, handle_query
from rcsr_flower.retrieval import evaluation as splits_module
from rcsr_flower.retrieval.evaluation import SplitTensors, embed_split, evaluate_retrieval
from rcsr_flower.retrieval.zero_shot import ZeroShotMemo, backbone_digest, is_identity


def refuse(*_args, **_kwargs):
    raise AssertionError("recomputed although remembered")


def test_fresh_adapters_add_nothing_bit_for_bit(backbone, splits):  # noqa: F811
    """What makes the memo right: until trained, shared and personal adapters leave
    every embedding exactly as the frozen backbone's."""
    _, test = splits
    shared, personal = backbone.new_adapters(), backbone.new_adapters(init_std=0.5)
    assert is_identity(shared, personal, None)
    plain = embed_split(backbone, test)
    adapted = embed_split(backbone, test, shared, personal)
    assert all(torch.equal(a, b) for a, b in zip(plain, adapted, strict=True))
    with torch.no_grad():
        next(iter(shared.adapters.values())).up.bias[3] = 1e-6
    assert not is_identity(shared) and not is_identity(personal, shared)


def test_round_zero_metrics_come_back_and_any_change_is_a_new_key(
    backbone,
    splits,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    _, test = splits
    memo = ZeroShotMemo(tmp_path)
    fresh = backbone.new_adapters()
    computed = evaluate_retrieval(backbone, test, fresh, memo=memo)
    assert computed == evaluate_retrieval(backbone, test)  # the same dict, bit for bit
    (kept,) = tmp_path.glob("retrieval-*.json")
    assert json.loads(kept.read_text()) == computed

    monkeypatch.setattr(splits_module, "embed_split", refuse)
    assert evaluate_retrieval(backbone, test, fresh, None, memo=memo) == computed
    changed_caption = SplitTensors(test.pixels, [list(c) for c in test.captions])
    changed_caption.captions[0][0] += " again"
    changed_pixel = SplitTensors(test.pixels.clone(), test.captions)
    changed_pixel.pixels[0, 0, 0, 0] += 1e-3
    other_weights = copy.deepcopy(backbone)
    with torch.no_grad():
        other_weights.model.text_projection.weight[0, 0] += 1e-3
    assert backbone_digest(other_weights) != backbone_digest(backbone)
    trained = backbone.new_adapters()
    with torch.no_grad():
        next(iter(trained.adapters.values())).up.weight[0, 0] = 1e-3
    for args, kwargs in [
        ((backbone, test, fresh), {"protocol": "paired"}),
        ((backbone, test, fresh), {"batch_size": 5}),
        ((backbone, changed_caption, fresh), {}),
        ((backbone, changed_pixel, fresh), {}),
        ((other_weights, test, other_weights.new_adapters()), {}),
        ((backbone, test, trained), {}),  # trained adapters are never looked up
    ]:
        with pytest.raises(AssertionError, match="recomputed"):
            evaluate_retrieval(*args, memo=memo, **kwargs)

    kept.write_text('{"rsum": ')  # torn: recomputed, and written whole again
    monkeypatch.undo()
    assert evaluate_retrieval(backbone, test, fresh, memo=memo) == computed
    assert json.loads(kept.read_text()) == computed


def test_clients_remember_round_zero_and_the_bootstrap_under_their_cache_dir(
    backbone,
    splits,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """Through the client handlers: the bootstrap groups and the round-0 evaluation come
    back bit for bit from ``<cache-dir>/zero-shot``; a trained round is evaluated;
    ``zero-shot-cache = false`` keeps nothing."""
    node = node_for(backbone, splits, "paired", cache_dir=str(tmp_path))
    query = ConfigRecord({"kind": "bootstrap", "prototype-slots": 8})
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    groups = handle_query(node, query)["groups"]
    zero_shot = handle_evaluate(node, ArrayRecord(theta), RecordDict())
    assert len(list((tmp_path / "zero-shot").iterdir())) == 2

    monkeypatch.setattr(task_module, "local_embeddings", refuse)
    monkeypatch.setattr(splits_module, "embed_split", refuse)
    again = handle_query(node, query)["groups"]
    assert sorted(again) == sorted(groups)
    assert all(torch.equal(again[k], groups[k]) for k in groups)
    kept = handle_evaluate(node, ArrayRecord(theta), RecordDict())
    assert {k: kept[k] for k in zero_shot if k != "evaluate-seconds"} == {
        k: v for k, v in zero_shot.items() if k != "evaluate-seconds"
    }
    moved = {k: v + 1e-3 if k.endswith("up.bias") else v for k, v in theta.items()}
    with pytest.raises(AssertionError, match="recomputed"):
        handle_evaluate(node, ArrayRecord(moved), RecordDict())
    other_seed = node_for(backbone, splits, "paired", cache_dir=str(tmp_path), seed=1)
    with pytest.raises(AssertionError, match="recomputed"):
        handle_query(other_seed, query)
    monkeypatch.undo()

    off = node_for(
        backbone, splits, "paired", cache_dir=str(tmp_path / "off"), zero_shot_cache=False
    )
    handle_query(off, query)
    handle_evaluate(off, ArrayRecord(theta), RecordDict())
    assert not (tmp_path / "off").exists()
