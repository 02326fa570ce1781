"""``amips mol``: train a Mixture-of-Logits (or dot-product) recommender on a ratings file and
evaluate it: ranking quality, then recall and latency of every top-k method against exact."""

from __future__ import annotations

import argparse
import math

from .._validate import InputError
from ._args import artifact_output, check_input_file, command_line

# Defaults of amips.mol.training.FitConfig and recommender.DEFAULT_MODEL, spelled out so that
# `amips --help` does not import torch (tests/test_cli_mol.py checks they agree).
TRAIN_DEFAULTS = {"epochs": 40, "patience": 8, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-3,
                  "warmup": 20}
MODEL_DEFAULTS = {"max_len": 50, "dropout": 0.3}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mol",
        help="Mixture-of-Logits recommender: train on a ratings CSV, evaluate",
        description="Train and evaluate a sequential recommender whose similarity is a "
                    "Mixture-of-Logits (or a dot product of the same parameter budget).",
    )
    sub = p.add_subparsers(dest="mol_command", metavar="{train,eval}")
    t = sub.add_parser(
        "train",
        help="train on a ratings CSV (userId,movieId,rating,timestamp)",
        description="Train on implicit feedback: each user's items in time order, the last one "
                    "held out for test and the one before for validation (early stopping on "
                    "validation HR@10). Rerun with --resume to continue an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--ratings", required=True, help="ratings CSV in the MovieLens layout")
    t.add_argument("--out", required=True, help="model folder to write")
    t.add_argument("--similarity", choices=["mol", "dot"], default="mol",
                   help="mol: Mixture-of-Logits head; dot: dot-product head of the same size")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or cuda_if_available")
    t.add_argument("--epochs", type=int, default=TRAIN_DEFAULTS["epochs"], help="maximum epochs (early stopping may end sooner)")
    t.add_argument("--patience", type=int, default=TRAIN_DEFAULTS["patience"], help="epochs without a better validation HR@10")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and negatives")
    t.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"], help="sequences per step")
    t.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"], help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=TRAIN_DEFAULTS["weight_decay"], help="AdamW weight decay")
    t.add_argument("--loss", choices=["auto", "full", "sampled"], default="auto",
                   help="full: softmax over the whole catalogue; sampled: uniform + in-batch "
                        "negatives with logQ correction; auto: full when it fits")
    t.add_argument("--warmup", type=int, default=TRAIN_DEFAULTS["warmup"], help="linear warm-up steps")
    t.add_argument("--negatives", type=int, default=None,
                   help="uniformly sampled negatives per step (default: dot 512, mol 256)")
    t.add_argument("--inbatch-negatives", type=int, default=None,
                   help="in-batch negatives per step (default: dot 512, mol 256)")
    t.add_argument("--max-positions", type=int, default=None,
                   help="positions per step the loss is taken on (0: all; default: dot 0, mol "
                        "1024; raise it on a GPU)")
    size = t.add_argument_group("model size")
    size.add_argument("--d", type=int, default=64, help="encoder width (query and item representation)")
    size.add_argument("--layers", type=int, default=2, help="causal self-attention layers")
    size.add_argument("--heads", type=int, default=2, help="attention heads")
    size.add_argument("--max-len", type=int, default=MODEL_DEFAULTS["max_len"], help="items of history the encoder reads")
    size.add_argument("--dropout", type=float, default=MODEL_DEFAULTS["dropout"], help="encoder dropout")
    size.add_argument("--p-q", type=int, default=4, help="MoL query components")
    size.add_argument("--p-x", type=int, default=4, help="MoL item components")
    size.add_argument("--d-p", type=int, default=32, help="MoL component dimension")
    size.add_argument("--gate-hidden", type=int, default=32, help="hidden width of the MoL gate MLPs")
    size.add_argument("--tau", type=float, default=0.05, help="MoL temperature (pair logits are divided by it)")
    t.add_argument("--drop-short-users", action="store_true",
                   help="drop users with fewer than 3 interactions instead of failing")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    t.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(mol_func=run_train)

    e = sub.add_parser(
        "eval",
        help="ranking metrics and top-k method recall/latency of a trained model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--model", required=True, help="folder written by `amips mol train`")
    e.add_argument("--ratings", required=True, help="ratings CSV (the one the model was trained on)")
    e.add_argument("--json", default=None, help="also write the results as JSON here (its folder must exist)")
    e.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--k", type=int, default=10, help="k of the top-k methods' recall and latency")
    e.add_argument("--methods", default="all",
                   help="comma-separated top-k methods to compare with exact ('all', 'none')")
    e.add_argument("--repeats", type=int, default=3, help="latency: best of this many runs")
    e.add_argument("--baselines", action="store_true",
                   help="also evaluate most-popular, item-kNN and EASE (tuned on validation) "
                        "on the same split, with paired intervals against the model")
    e.set_defaults(mol_func=run_eval)
    p.set_defaults(func=lambda args: _dispatch(p, args))


def _dispatch(parser, args) -> int:
    func = getattr(args, "mol_func", None)
    if func is None:
        parser.print_help()
        return 2
    return func(args)


def _device(name: str) -> str:
    import torch

    if name == "cuda_if_available":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device: cannot use {name!r}: {str(exc).splitlines()[0]}") from None
    return name


def run_train(args) -> int:
    from ..mol.recommender import DEFAULT_MODEL
    from ..mol.training import FitConfig, fit

    for name in ("epochs", "patience", "batch_size", "checkpoint_every", "d", "layers", "heads", "max_len", "p_q", "p_x",
                 "d_p", "gate_hidden"):
        if getattr(args, name) < 1:
            raise InputError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.max_minutes is not None and not (args.max_minutes > 0 and math.isfinite(args.max_minutes)):
        raise InputError(f"max-minutes: must be a positive number, got {args.max_minutes}")
    if not (0 <= args.dropout < 1):
        raise InputError(f"dropout: must be in [0, 1), got {args.dropout}")
    model = dict(DEFAULT_MODEL, d=args.d, n_layers=args.layers, n_heads=args.heads, max_len=args.max_len,
                 dropout=args.dropout,
                 p_q=args.p_q, p_x=args.p_x, d_p=args.d_p, gate_hidden=args.gate_hidden, tau=args.tau)
    cfg = FitConfig(similarity=args.similarity, epochs=args.epochs, patience=args.patience,
                    batch_size=args.batch_size, lr=args.lr, loss=args.loss, warmup=args.warmup,
                    weight_decay=args.weight_decay, n_uniform=args.negatives,
                    n_inbatch=args.inbatch_negatives, max_positions=args.max_positions, seed=args.seed,
                    checkpoint_every=args.checkpoint_every, model=model)
    if args.resume and args.overwrite:
        raise InputError("resume: --resume and --overwrite exclude each other")
    cfg = cfg.resolved()
    cfg.check()
    device = _device(args.device)
    check_input_file(args.ratings, "ratings")
    # checked, locked, and with --overwrite built beside the old run and swapped in at the end
    with artifact_output(args.out, "out", kind="mol run", overwrite=args.overwrite,
                         command=command_line(args)) as work:
        m = fit(args.ratings, work, cfg, device=device, resume=args.resume, overwrite=False,
                progress=not args.quiet, drop_short=args.drop_short_users, max_minutes=args.max_minutes)
    if m.get("stopped"):
        print(f"stopped after --max-minutes at epoch {m['epoch']}, step {m['global_step']}; "
              "rerun with --resume to continue")
        return 0
    c = m["n_params"]
    print(f"model: {m['similarity']} head, {c['total']:,} params (head {c['head']:,}, encoder "
          f"{c['encoder']:,} of which item embedding {c['item_embedding']:,})")
    print(f"best epoch {m['best_epoch']} of {m['epochs_run']}, {m['train_seconds']:.0f} s training")
    _print_metrics("validation", m["validation"])
    _print_metrics("test", m["test"])
    return 0


def _print_metrics(name: str, m: dict) -> None:
    keys = ("hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "mrr")
    print(f"{name} ({m['n_users']} users): " + "  ".join(f"{k.upper()} {m[k]:.4f}" for k in keys))


def _ci(v) -> str:
    return f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"


def _print_table(res: dict) -> None:
    """The model and the baselines on the same test targets, 95% bootstrap intervals over
    users; for baselines, the paired difference model - baseline."""
    rows = [(f"model ({res['similarity']})", res["test_ci"], None, "")]
    for b in res.get("baselines", []):
        params = ", ".join(f"{k}={v:g}" for k, v in b["params"].items())
        rows.append((b["name"], b["test_ci"], b.get("model_minus_baseline"), params))
    print("test, 95% bootstrap intervals over users (model - baseline: paired):")
    print(f"  {'':<12} {'HR@10':<24} {'NDCG@10':<24} {'HR@50':<24} "
          f"{'model - it, HR@10':<26} {'model - it, NDCG@10':<26} tuned on validation")
    for name, ci, diff, params in rows:
        d = ("", "") if diff is None else (_ci_signed(diff["hr@10"]), _ci_signed(diff["ndcg@10"]))
        print(f"  {name:<12} {_ci(ci['hr@10']):<24} {_ci(ci['ndcg@10']):<24} {_ci(ci['hr@50']):<24} "
              f"{d[0]:<26} {d[1]:<26} {params}")


def _ci_signed(v) -> str:
    return f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"


def run_eval(args) -> int:
    from .._io import atomic_write_json
    from ..mol.evaluate import evaluate

    if args.k < 1:
        raise InputError(f"k: must be >= 1, got {args.k}")
    if args.repeats < 1:
        raise InputError(f"repeats: must be >= 1, got {args.repeats}")
    from ..provenance import check_mol_run
    from ._args import output_file

    json_path = output_file(args.json, "json", overwrite=args.overwrite)
    device = _device(args.device)
    check_mol_run(args.model, args.ratings)  # finished, files as recorded, these very ratings
    res = evaluate(args.model, args.ratings, device=device, k=args.k,
                   methods=args.methods, repeats=args.repeats, baselines=args.baselines)
    c = res["n_params"]
    print(f"model: {res['similarity']} head, {c['total']:,} params; {res['n_items']:,} items, "
          f"{res['test']['n_users']} users")
    _print_metrics("test", res["test"])
    _print_table(res)
    if res["methods"]:
        print(f"top-{res['k']} methods vs exact ({res['n_queries']} queries, seen items excluded):")
        print(f"  {'method':<16} {'recall@k':>9} {'top1 found':>11} {'ms/batch':>10} {'items scored':>13}")
        for row in res["methods"]:
            scored = "" if row.get("items_scored") is None else f"{row['items_scored']:.0f}"
            print(f"  {row['method']:<16} {row['recall']:>9.4f} {row['top1_found']:>11.4f} "
                  f"{row['ms']:>10.2f} {scored:>13}")
    if args.json:
        atomic_write_json(json_path, res)
        print(f"wrote {args.json}")
    return 0

