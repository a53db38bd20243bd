"""§3–§5 formulas against hand-computed values."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rcsr_flower.client import losses
from rcsr_flower.retrieval.prototypes import PrototypeBank, SlotStats
from rcsr_flower.routing import MinimaxWeights, SemanticRouter, entropy, fuse_weights
from rcsr_flower.server.retrieval_task import RouterBetas, router_loss

C45 = 1 - 1 / math.sqrt(2)  # 1 - cos(45°)


# ------------------------------------------------------------------------------ router
def test_router_weights_on_the_simplex_and_permutation_equivariant():
    torch.manual_seed(0)
    router = SemanticRouter(token_dim=11, hidden=16, heads=4, blocks=2, dropout=0.1).eval()
    tokens = torch.randn(5, 11)
    w = router(tokens)
    assert w.shape == (5,) and torch.all(w > 0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(router(tokens[perm]), w[perm], atol=1e-6)


def test_router_rejects_wrong_token_shape():
    with pytest.raises(ValueError, match=r"router tokens must be \[K, 11\]"):
        SemanticRouter(token_dim=11, hidden=8, heads=2)(torch.randn(3, 10))


def test_router_loss_hand_computed():
    # d = 2; two clients with equal router weight.
    w = torch.tensor([0.5, 0.5], requires_grad=True)
    p_i = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p_t = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    g_i, g_t = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    # ĝ_I = (1,1)/√2 vs g_I=(1,0): 1-cos = C45; ĝ_T = -(1,1)/√2 vs (-1,0): C45.
    # a_1=(1,0), a_2=(0,1), â=(1,1)/√2, axis=normalize(g_I-g_T)=(1,0):
    # A = ½·C45 + ½·(½·C45 + ½·C45) = C45.   H(w) = ln 2.
    inner = C45 + C45 - 0.1 * math.log(2) + 0.3 * C45
    expected = math.log1p(math.exp(inner))
    loss = router_loss(w, p_i, p_t, g_i, g_t, RouterBetas(1.0, 1.0, 0.1, 0.3))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_router_loss_prefers_clients_aligned_with_the_global_prototypes():
    p_i = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p_t = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    g_i, g_t = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    betas = RouterBetas(1.0, 1.0, 0.0, 0.0)
    aligned = router_loss(torch.tensor([0.9, 0.1]), p_i, p_t, g_i, g_t, betas)
    off = router_loss(torch.tensor([0.1, 0.9]), p_i, p_t, g_i, g_t, betas)
    assert aligned < off


def test_entropy_and_fuse():
    assert entropy(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))
    fused = fuse_weights(torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4]))
    # (0.12, 0.32) / 0.44
    assert fused.tolist() == pytest.approx([0.12 / 0.44, 0.32 / 0.44])
    with pytest.raises(ValueError, match="vanish"):
        fuse_weights(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------ minimax
def test_minimax_update_hand_computed():
    m = MinimaxWeights(3, eta=0.1, tau=0.1)
    w = m.step([0, 2], [1.0, 2.0])
    q = [
        (1 / 3 * math.exp(0.1)) ** (1 / 1.1),
        (1 / 3) ** (1 / 1.1),
        (1 / 3 * math.exp(0.2)) ** (1 / 1.1),
    ]
    q = [x / sum(q) for x in q]
    assert m.q.tolist() == pytest.approx(q)
    assert w.tolist() == pytest.approx([q[0] / (q[0] + q[2]), q[2] / (q[0] + q[2])])
    assert w[1] > w[0]  # the higher loss gets more weight


def test_minimax_survives_huge_losses_and_round_trips():
    m = MinimaxWeights(4)
    w = m.step([1, 3], [1e6, 1.0])
    assert torch.isfinite(torch.as_tensor(w)).all() and w[0] == pytest.approx(1.0)
    again = MinimaxWeights.from_state(m.state())
    assert again.q.tolist() == m.q.tolist()


# ------------------------------------------------------------------------------ bank
def test_bank_bootstrap_count_weighted_slots():
    # client A: two groups far apart; client B: one group near A's first.
    e = torch.eye(4)
    img = [torch.stack([e[0], e[2]]), torch.stack([e[0] * 0.8 + e[1] * 0.2])]
    txt = [torch.stack([e[1], e[3]]), torch.stack([e[1]])]
    counts = [torch.tensor([3.0, 1.0]), torch.tensor([1.0])]
    bank = PrototypeBank.bootstrap(img, txt, counts, num_slots=2, seed=0)
    assert bank.slots == 2
    rows = sorted(range(2), key=lambda c: -bank.image[c, 0].item())
    big, small = rows
    # big slot: count-weighted image mean (3·e0 + 1·(0.8e0+0.2e1))/4 = (3.8, 0.2, 0, 0)/4
    assert bank.image[big].tolist() == pytest.approx(
        F.normalize(torch.tensor([3.8, 0.2, 0.0, 0.0]), dim=0).tolist(), abs=1e-6
    )
    assert bank.text[big].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0], abs=1e-6)
    assert bank.image[small].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0], abs=1e-6)
    # g = normalize(count-weighted mean of the slots): 4 in the big slot, 1 in the small
    g_i = F.normalize(4 * bank.image[big] + 1 * bank.image[small], dim=0)
    assert bank.g_image.tolist() == pytest.approx(g_i.tolist(), abs=1e-6)


def test_bank_bootstrap_fewer_groups_than_slots_and_no_paired_client():
    bank = PrototypeBank.bootstrap(
        [torch.eye(3)[:1]], [torch.eye(3)[1:2]], [torch.tensor([5.0])], num_slots=32
    )
    assert bank.slots == 1
    with pytest.raises(ValueError, match="at least one paired client"):
        PrototypeBank.bootstrap([], [], [], num_slots=4)


def make_bank():
    return PrototypeBank(
        image=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        text=torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        g_image=torch.tensor([1.0, 0.0]),
        g_text=torch.tensor([0.0, 1.0]),
    )


def test_bank_ema_update_only_from_holders_and_slots_with_mass():
    bank = make_bank()
    # one image-only client: slot 0 holds two images summing to (0, 2); slot 1 empty
    stats = SlotStats(
        image_sum=torch.tensor([[0.0, 2.0], [0.0, 0.0]]),
        image_count=torch.tensor([2.0, 0.0]),
        text_sum=None,
        text_count=None,
    )
    p_i = torch.tensor([0.0, 1.0])
    bank.update([1.0], [stats], [p_i], [None], momentum=0.95)
    assert bank.image[0].tolist() == pytest.approx(
        F.normalize(torch.tensor([0.95, 0.05]), dim=0).tolist()
    )
    assert bank.image[1].tolist() == [0.0, 1.0]  # no mass: unchanged
    assert bank.text.tolist() == make_bank().text.tolist()  # nobody has text
    assert bank.g_text.tolist() == [0.0, 1.0]
    assert bank.g_image.tolist() == pytest.approx(
        F.normalize(torch.tensor([0.95, 0.05]), dim=0).tolist()
    )


def test_bank_update_weights_clients_by_w_and_count():
    bank = make_bank()
    a = SlotStats(torch.tensor([[1.0, 0.0], [0, 0]]), torch.tensor([1.0, 0]), None, None)
    b = SlotStats(torch.tensor([[0.0, 3.0], [0, 0]]), torch.tensor([3.0, 0]), None, None)
    bank.update([0.5, 0.5], [a, b], [None, None], [None, None], momentum=0.0)
    # mean_0 = (0.5·(1,0) + 0.5·(0,3)) / (0.5·1 + 0.5·3) = (0.25, 0.75)
    assert bank.image[0].tolist() == pytest.approx(
        F.normalize(torch.tensor([0.25, 0.75]), dim=0).tolist()
    )


def test_retrieval_consistency():
    bank = make_bank()
    # image-side slot means: slot 0 ~ (1,0) retrieves text slot 1=(1,0)? P_T[0]=(0,1), P_T[1]=(1,0)
    s = SlotStats(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 1.0]), None, None)
    # slot 0 mean (0,1) -> best text slot 0 (0,1): hit; slot 1 mean (1,0) -> text slot 1: hit
    assert bank.retrieval_consistency(s) == 1.0
    s2 = SlotStats(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0]), None, None)
    assert bank.retrieval_consistency(s2) == 0.0  # (1,0) retrieves text slot 1, not 0


# ------------------------------------------------------------------------------ losses
def test_anchor_ce_pulls_toward_the_other_sides_slot_prototype():
    p_text = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    raw = torch.tensor([[0.2, 0.9, 0.4]], requires_grad=True)
    slot = torch.tensor([2])
    loss = losses.anchor_ce(F.normalize(raw, dim=1), p_text, slot, temperature=0.07)
    # hand value: logits = z·P/τ
    z = F.normalize(raw.detach(), dim=1)[0]
    logits = z / 0.07
    assert loss.item() == pytest.approx((torch.logsumexp(logits, 0) - logits[2]).item(), rel=1e-6)
    loss.backward()
    stepped = F.normalize(raw.detach() - 0.01 * raw.grad, dim=1)[0]
    assert stepped[2] > z[2]  # closer to P_T[2]


def test_info_nce_hand_computed():
    z = torch.eye(2)
    # logits = I/τ; each row CE = log(1 + e^{-1/τ})
    expected = math.log1p(math.exp(-1 / 0.5))
    assert losses.info_nce_sym(z, z, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_prox_hand_computed():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    value = losses.prox([p], [torch.zeros(2)])
    assert value.item() == pytest.approx(2.5)
    value.backward()
    assert p.grad.tolist() == [1.0, 2.0]


def test_proto_alignment_uses_text_side_slots():
    p_img = torch.eye(2)
    p_txt = torch.eye(2)
    z_i = torch.tensor([[1.0, 0.0]])
    z_t = torch.tensor([[0.0, 1.0]])  # text picks slot 1
    value = losses.proto_alignment(z_i, z_t, p_img, p_txt, temperature=1.0)
    ce = lambda z, target: (torch.logsumexp(z, 0) - z[target]).item()  # noqa: E731
    assert value.item() == pytest.approx(
        ce(torch.tensor([1.0, 0.0]), 1) + ce(torch.tensor([0.0, 1.0]), 1)
    )


# ------------------------------------------------------------------ holders-only objective
def test_router_loss_holders_only_hand_computed():
    """§5 step 7 (ours, revised): a placeholder never enters ĝ or A."""
    g_i, g_t = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    # 0 paired; 1 image-only (text side: the placeholder g_T); 2 text-only (image: g_I)
    p_i = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), g_i])
    p_t = torch.stack([torch.tensor([-1.0, 0.0]), g_t, torch.tensor([0.0, -1.0])])
    has_i, has_t = torch.tensor([True, True, False]), torch.tensor([True, False, True])
    w = torch.tensor([0.5, 0.25, 0.25])
    # ĝ_I = normalize(0.5·(1,0) + 0.25·(0,1)): 1-cos = 1 - 0.5/√0.3125; ĝ_T the mirror image
    drift = 1 - 0.5 / math.sqrt(0.3125)
    # only client 0 is paired: a_0 = (1,0) = â = axis, so A = 0
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    inner = 2 * drift - 0.1 * h
    loss = router_loss(w, p_i, p_t, g_i, g_t, RouterBetas(), has_image=has_i, has_text=has_t)
    assert loss.item() == pytest.approx(math.log1p(math.exp(inner)), rel=1e-6)


def test_router_loss_axis_term_is_zero_without_a_paired_client():
    g = torch.Generator().manual_seed(0)
    p_i, p_t = F.normalize(torch.randn(3, 6, generator=g), dim=1), torch.zeros(3, 6)
    p_t[2] = F.normalize(torch.randn(6, generator=g), dim=0)
    has_i, has_t = torch.tensor([True, True, False]), torch.tensor([False, False, True])
    g_i, g_t = F.normalize(torch.randn(6, generator=g), dim=0), p_t[2].clone()
    w = torch.tensor([0.2, 0.3, 0.5])

    def loss(axis: float) -> float:
        betas = RouterBetas(1.0, 1.0, 0.1, axis)
        return router_loss(w, p_i, p_t, g_i, g_t, betas, has_image=has_i, has_text=has_t).item()

    assert loss(0.3) == loss(0.0) == loss(5.0)


def symmetric_round():
    """2 paired, 2 image-only, 1 text-only clients; every held prototype is its global
    prototype plus an equal-sized orthogonal perturbation, every missing side the global
    prototype itself (what a unimodal client reports)."""
    e = torch.eye(16)
    g_i, g_t = e[0], e[1]
    has_i = torch.tensor([True, True, True, True, False])
    has_t = torch.tensor([True, True, False, False, True])
    p_i, p_t, j = [], [], 2
    for k in range(5):
        p_i.append(F.normalize(g_i + 0.5 * e[j], dim=0) if has_i[k] else g_i)
        j += int(has_i[k])
        p_t.append(F.normalize(g_t + 0.5 * e[j], dim=0) if has_t[k] else g_t)
        j += int(has_t[k])
    return torch.stack(p_i), torch.stack(p_t), g_i, g_t, has_i, has_t


def logit_gradient(revised: bool) -> torch.Tensor:
    p_i, p_t, g_i, g_t, has_i, has_t = symmetric_round()
    logits = torch.zeros(5, requires_grad=True)
    masks = {"has_image": has_i, "has_text": has_t} if revised else {}
    betas = RouterBetas(1.0, 1.0, 0.0, 0.0)  # the prototype terms alone
    router_loss(torch.softmax(logits, 0), p_i, p_t, g_i, g_t, betas, **masks).backward()
    return logits.grad


def test_router_gradient_no_longer_pushes_weight_toward_clients_lacking_a_modality():
    # literal reading (every client in every term): the placeholders look perfect, so the
    # gradient moves weight from the paired clients (0, 1) onto the unimodal ones (2, 3, 4)
    literal = logit_gradient(revised=False)
    assert (literal[:2] > 1e-4).all() and (literal[2:] < -1e-4).all()
    # holders only: equally good clients, no push either way
    assert logit_gradient(revised=True).abs().max().item() < 1e-6


def test_router_loss_does_not_depend_on_placeholder_values():
    p_i, p_t, g_i, g_t, has_i, has_t = symmetric_round()
    w = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    masks = {"has_image": has_i, "has_text": has_t}
    before = router_loss(w, p_i, p_t, g_i, g_t, RouterBetas(), **masks)
    p_t2, p_i2 = p_t.clone(), p_i.clone()
    p_t2[2:4] = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    p_i2[4] = -g_i
    assert router_loss(w, p_i2, p_t2, g_i, g_t, RouterBetas(), **masks).item() == before.item()


def test_router_weights_in_eval_mode_are_deterministic_and_equivariant():
    torch.manual_seed(0)
    router = SemanticRouter(token_dim=11, hidden=16, heads=4, blocks=2, dropout=0.5).eval()
    tokens = torch.randn(5, 11)
    with torch.no_grad():
        first, second = router(tokens), router(tokens)
        perm = torch.tensor([4, 2, 0, 3, 1])
        permuted = router(tokens[perm])
        noisy = router.train()(tokens)
    assert torch.equal(first, second)
    assert torch.allclose(permuted, first[perm], atol=1e-6)
    assert not torch.allclose(noisy, first)  # what dropout would have let into θ


def test_update_geometry_is_bounded_hand_computed():
    from rcsr_flower.client.training import update_geometry

    v, t = "adapters.vision_0.up.weight", "adapters.text_0.up.weight"
    image_only = {v: torch.tensor([3.0, 4.0]), t: torch.zeros(2)}  # the text tower never moved
    g = update_geometry(image_only, None, num_examples=25)
    # [log(1+5), 5/(5+0), cos 0 without Δ_prev, log(1+5/√25)]
    assert g.tolist() == pytest.approx([math.log(6), 1.0, 0.0, math.log(2)])
    both = {v: torch.tensor([3.0, 4.0]), t: torch.tensor([0.0, 15.0])}
    g = update_geometry(both, {v: torch.tensor([3.0, 4.0]), t: torch.zeros(2)}, num_examples=4)
    norm = math.sqrt(250)
    assert g.tolist() == pytest.approx(
        [math.log1p(norm), 5 / 20, 25 / (norm * 5), math.log1p(norm / 2)], rel=1e-6
    )
    idle = update_geometry({v: torch.zeros(2), t: torch.zeros(2)}, None, num_examples=4)
    assert idle.tolist() == [0.0, 0.5, 0.0, 0.0]  # moved neither tower: share ½


def _rcsr_imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {n for n in names if n == "rcsr_flower" or n.startswith("rcsr_flower.")}


def test_the_routing_library_imports_nothing_of_the_retrieval_app():
    """``rcsr_flower.routing`` is the task-agnostic core other tasks build on: it may
    import only itself, and the second app (examples/label-routing) only it."""
    root = Path(__file__).resolve().parents[1]
    for folder in (root / "rcsr_flower" / "routing", root / "examples" / "label-routing"):
        outside = {
            f"{path.relative_to(root)}: {name}"
            for path in sorted(folder.rglob("*.py"))
            for name in _rcsr_imports(path)
            if not name.startswith("rcsr_flower.routing")
        }
        assert not outside, outside
