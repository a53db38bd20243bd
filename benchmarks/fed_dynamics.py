"""Federated training dynamics in one process: where does the global rsum go, and why?

A full ``flwr run`` of the embedded default takes minutes; asking "does the drop come
from non-IID data, from missing modalities, from prototype anchoring or from too few
local steps?" needs many runs. This loop runs the *same* client code
(``handlers.setup``, ``training.local_train`` with the §4 loss, the bootstrap bank of
``server.app.bootstrap_bank``) for all clients in one process, aggregates
``θ ← θ + η_s Σ_k (n_k/Σn) Δ_k`` tower by tower over the clients holding each tower, as
§5 step 5 (revised) and the default ``tower-aggregation`` (``--plain-aggregation``:
over all clients) (sample-count weights: no router, no minimax, no bank update: it
isolates the client side) and evaluates the global adapters on the global test
split after every round. It is a diagnostic, not the product: numbers from it are labelled
as such in docs.

    .venv/bin/python benchmarks/fed_dynamics.py                       # S4, anchoring on
    .venv/bin/python benchmarks/fed_dynamics.py --no-anchoring        # S4, FedAvg-like
    .venv/bin/python benchmarks/fed_dynamics.py --missing-rate 0 --partitioning iid  # S1
    .venv/bin/python benchmarks/fed_dynamics.py --partitioning iid --personal-adapters all

With ``--personal-adapters all|paired`` every client (or only the paired ones) also trains
personal adapters kept across rounds (§2), and each round ends with the
personalised breakdown of §6 per modality group, plus, for each unimodal client, how
far its own modality's test embeddings have collapsed: the mean pairwise cosine of its
test images (image-only) or captions (text-only) with shared + personal adapters, and the
norm of its personal adapters.

With ``--json`` the per-round lines go to stderr and stdout ends with one JSON line:
``{"settings": {...}, "rsum": [[round, rsum], ...], "personalised": [[round, {...}], ...]}``
(``personalised`` empty without personal adapters).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
from flwr.app import RecordDict

from rcsr_flower.client.handlers import setup
from rcsr_flower.client.training import TrainSettings, bootstrap_groups, local_train
from rcsr_flower.config import RunConfig
from rcsr_flower.federation import global_test_set
from rcsr_flower.retrieval.evaluation import embed_split, evaluate_retrieval, preprocess_split
from rcsr_flower.retrieval.metrics import retrieval_recall
from rcsr_flower.server.app import bootstrap_bank


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--missing-rate", type=float, default=0.5)
    parser.add_argument("--partitioning", default="dirichlet")
    parser.add_argument(
        "--partition-by", default="kmeans", help="'kmeans' or a content attribute, e.g. color"
    )
    parser.add_argument("--partition-sizes", choices=["dirichlet", "equal"], default="dirichlet")
    parser.add_argument("--train-max-items", type=int, default=0)
    parser.add_argument(
        "--local-steps", type=int, default=0, help="> 0: steps a round, overriding epochs"
    )
    parser.add_argument("--no-anchoring", action="store_true")
    parser.add_argument("--anchoring-loss", choices=["soft", "ce"], default="soft")
    parser.add_argument(
        "--paired-only", action="store_true", help="average only the paired clients' updates"
    )
    parser.add_argument("--lambda-anchor", type=float, default=1.0)
    parser.add_argument("--lambda-align", type=float, default=0.1)
    parser.add_argument("--lambda-stab", type=float, default=0.01)
    parser.add_argument("--prototype-slots", type=int, default=32)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--constant-lr", action="store_true", help="no §1 schedule")
    parser.add_argument(
        "--plain-aggregation", action="store_true", help="average every tower over all clients"
    )
    parser.add_argument(
        "--personal-adapters",
        choices=["off", "all", "paired"],
        default="off",
        help="personal adapters on every client, on paired clients only, or none",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    log_to = sys.stderr if args.json else sys.stdout

    cfg = RunConfig().replace(
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        alpha=args.alpha,
        missing_rate=args.missing_rate,
        partitioning=args.partitioning,
        partition_by=args.partition_by,
        partition_sizes=args.partition_sizes,
        train_max_items=args.train_max_items,
        local_steps=args.local_steps,
        anchoring_loss=args.anchoring_loss,
        prototype_slots=args.prototype_slots,
        personal_adapters=args.personal_adapters != "off",
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    raw = cfg.to_flower()
    nodes = [
        setup(raw, {"partition-id": i, "num-partitions": args.clients}) for i in range(args.clients)
    ]
    backbone = nodes[0].backbone
    print("clients:", [(n.data.modality, len(n.data.train)) for n in nodes], file=log_to)
    anchoring = not args.no_anchoring
    bank = None
    if anchoring:
        groups = [
            g
            for n in nodes
            if (g := bootstrap_groups(backbone, n.data, cfg.prototype_slots, 512, n.seed(0)))
            is not None
        ]
        bank = bootstrap_bank([{"groups": g} for g in groups], cfg)
    test = preprocess_split(backbone, global_test_set(cfg))
    template = nodes[0].adapters()
    theta = {k: v.detach().clone() for k, v in template.state_dict().items()}

    def global_rsum() -> float:
        template.load_state_dict(theta)
        return float(evaluate_retrieval(backbone, test, template)["rsum"])

    # created as a node creates them (ClientNode.personal): W_up = 0, so they start as the
    # frozen backbone
    personal = {
        i: n.personal(RecordDict())
        for i, n in enumerate(nodes)
        if args.personal_adapters == "all"
        or (args.personal_adapters == "paired" and n.data.modality == "paired")
    }

    def personalised() -> dict:
        """Per modality group: mean local-test rsum; per unimodal client: collapse."""
        template.load_state_dict(theta)
        groups: dict[str, list[float]] = {}
        collapse = {}
        for i, n in enumerate(nodes):
            mine = personal.get(i)
            for a in (template, mine):  # as evaluate_retrieval does; training sets train()
                if a is not None:
                    a.eval()
            # embedded once: the rsum (evaluate_retrieval's) and the collapse measure
            z_i, z_t, owner = embed_split(backbone, n.data.test, template, mine)
            groups.setdefault(n.data.modality, []).append(
                float(retrieval_recall(z_i, z_t, owner)["rsum"])
            )
            if n.data.modality != "paired":
                z = z_i if n.data.modality == "image-only" else z_t
                sim = z @ z.T
                off = (sim.sum() - sim.diagonal().sum()) / (len(z) * (len(z) - 1))
                norm = (
                    float(torch.cat([p.detach().flatten() for p in mine.parameters()]).norm())
                    if mine is not None
                    else 0.0
                )
                collapse[i] = (n.data.modality, round(float(off), 3), round(norm, 2))
        means = {g: round(sum(v) / len(v), 1) for g, v in sorted(groups.items())}
        return {"groups": means, "collapse": collapse}

    curve = [[0, global_rsum()]]
    track = [[0, personalised()]] if personal else []
    if track:
        print(f"round 0: personalised {track[-1][1]}", file=log_to, flush=True)
    print(f"round 0: rsum {curve[0][1]:.1f}", file=log_to, flush=True)
    rng = random.Random(args.seed)
    per_round = min(args.clients, max(2, int(args.clients * args.fraction)))
    start = time.perf_counter()
    for server_round in range(1, args.rounds + 1):
        lr = args.lr if args.constant_lr else cfg.lr_at(server_round)
        chosen = sorted(rng.sample(range(args.clients), per_round))
        settings = TrainSettings(
            lr=lr,
            epochs=args.local_epochs,
            batch_size=args.batch_size,
            weight_decay=cfg.weight_decay,
            lambda_anchor=args.lambda_anchor,
            lambda_align=args.lambda_align if anchoring else 0.0,
            prox_mu=args.lambda_stab,
            anchoring=anchoring,
            anchoring_loss=args.anchoring_loss,
            steps=args.local_steps,
        )
        deltas, sizes, losses = [], [], []
        for c in chosen:
            shared = nodes[c].adapters(theta)
            out = local_train(
                backbone,
                shared,
                personal.get(c),
                nodes[c].data,
                bank,
                settings,
                nodes[c].seed(server_round),
            )
            trained = shared.state_dict()
            deltas.append({k: trained[k].detach() - theta[k] for k in theta})
            sizes.append(out["num_examples"])
            losses.append(round(out["loss"], 3))
        mods = [nodes[c].data.modality[0] for c in chosen]
        for k in theta:
            lacks = "t" if k.startswith("adapters.vision") else "i"  # clients without this tower
            members = [
                j
                for j, m in enumerate(mods)
                if (args.plain_aggregation or m != lacks) and not (args.paired_only and m != "p")
            ]
            total = sum(sizes[j] for j in members)
            if total:
                theta[k] = theta[k] + args.server_lr * sum(
                    sizes[j] / total * deltas[j][k] for j in members
                )
        curve.append([server_round, global_rsum()])
        print(
            f"round {server_round}: rsum {curve[-1][1]:.1f}  lr {lr:.1e}  clients "
            f"{list(zip(chosen, mods, strict=True))}  loss {losses}  "
            f"{time.perf_counter() - start:.0f} s",
            file=log_to,
            flush=True,
        )
        if personal:
            track.append([server_round, personalised()])
            print(f"round {server_round}: personalised {track[-1][1]}", file=log_to, flush=True)
    if args.json:
        print(json.dumps({"settings": vars(args), "rsum": curve, "personalised": track}))


if __name__ == "__main__":
    main()
