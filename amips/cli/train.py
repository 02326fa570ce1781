"""``amips train``: train a SupportNet, KeyNet or multi-head router on exact MIPS labels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._outputs import check_output_folder
from .._validate import InputError
from ._args import (
    add_device,
    add_overwrite,
    add_threads,
    artifact_output,
    check_input_file,
    command_line,
    device_and_threads,
    load_partitions,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a SupportNet / KeyNet / multi-head router",
        description=(
            "Train a network that amortizes MIPS over KEYS for queries like TRAIN_QUERIES. "
            "Labels are read from --labels (written by `amips labels`) or computed exactly and "
            "cached in RUNDIR/labels. With --partitions the SupportNet and router-mlp get one "
            "head per IVF list. Rerun with --resume to continue an interrupted run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--keys", required=True, help="key database (.npy, .fvecs, file.hdf5:dataset)")
    p.add_argument("--queries", required=True, help="training queries (same formats)")
    p.add_argument("--model", required=True, choices=["keynet", "supportnet", "router-mlp"])
    p.add_argument("--out", required=True, help="run folder (config, checkpoints, metrics)")
    p.add_argument("--labels", default=None, help="labels folder written by `amips labels`")
    p.add_argument("--partitions", default=None, help="partitions.npy: IVF list id per key")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4096 on CUDA, 1024 on CPU")
    add_device(p, default="cuda_if_available")
    add_threads(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_overwrite(p, "a run")
    size = p.add_argument_group("model size")
    size.add_argument("--width", type=int, default=None)
    size.add_argument("--depth", type=int, default=3)
    size.add_argument("--param-fraction", type=float, default=None,
                      help="parameter budget as a fraction of n_keys*d (sets the width)")
    size.add_argument("--homogeneous", action="store_true",
                      help="SupportNet: bias-free leaky-ReLU ICNN, exactly 1-homogeneous and convex")
    size.add_argument("--inject-every", type=int, default=1, help="SupportNet: re-inject q every k-th layer")
    size.add_argument("--no-residual", action="store_true", help="KeyNet/router-mlp: plain MLP")
    size.add_argument("--no-centroid-init", action="store_true",
                      help="multi-head routers: do not start each head's linear term at its list's centroid")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--optimizer", choices=["adam", "adamw"], default="adamw")
    opt.add_argument("--warmup", type=int, default=100)
    opt.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    opt.add_argument("--ema", type=float, default=0.999)
    opt.add_argument("--w-score", type=float, default=1.0)
    opt.add_argument("--w-key", type=float, default=1.0)
    opt.add_argument("--noise", type=float, default=0.05,
                     help="augmentation: Gaussian noise std relative to ||q||/sqrt(d) (0: off)")
    opt.add_argument("--noise-fraction", type=float, default=0.5, help="share of each batch made noisy")
    opt.add_argument("--noise-copies", type=int, default=None,
                     help="noisy copies of every training query, made once and labelled in one bulk "
                          "pass (default: 16 on CUDA, 1 on CPU; 0: no noise)")
    opt.add_argument("--noise-online", action="store_true",
                     help="label noisy queries on the fly every step instead (slow on CPU)")
    opt.add_argument("--focus", type=float, default=1.5,
                     help="multi-head routers: weight each head's squared error towards the lists whose "
                          "support value is within ~FOCUS standard deviations of the best (0: plain MSE)")
    opt.add_argument("--val-fraction", type=float, default=0.04)
    opt.add_argument("--eval-every", type=int, default=200)
    opt.add_argument("--checkpoint-every", type=int, default=200)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    opt.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import math

    import torch

    from .. import distributed
    from ..data import load_array
    from ..noisy import default_batch_size
    from ..train import TrainConfig, train

    # every argument and input is checked before --out is touched
    device_and_threads(args)
    device = args.device
    if device == "cuda_if_available":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.overwrite and args.resume:
        raise InputError("overwrite: --overwrite starts the run again, --resume continues it; pass one")
    if args.seed < 0:
        raise InputError(f"seed: must be >= 0, got {args.seed}")
    if args.max_minutes is not None and not (args.max_minutes > 0 and math.isfinite(args.max_minutes)):
        raise InputError(f"max-minutes: must be a positive number, got {args.max_minutes}")
    for name in ("keys", "queries", "partitions"):
        check_input_file(getattr(args, name), name)
    if args.labels is not None and not Path(args.labels).is_dir():
        raise InputError(f"labels: {args.labels} is not a folder (expected the --out of `amips labels`)")
    cfg = TrainConfig(
        model=args.model, width=args.width, depth=args.depth, param_fraction=args.param_fraction,
        homogeneous=args.homogeneous, inject_every=args.inject_every, residual=not args.no_residual,
        steps=args.steps,
        batch_size=args.batch_size if args.batch_size is not None else default_batch_size(device), lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, warmup=args.warmup, clip=args.clip, ema=args.ema,
        w_score=args.w_score, w_key=args.w_key, noise=args.noise, noise_fraction=args.noise_fraction,
        noise_copies=args.noise_copies, noise_online=args.noise_online,
        val_fraction=args.val_fraction, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed, bf16=not args.no_bf16,
        max_minutes=args.max_minutes, centroid_init=not args.no_centroid_init,
        focus=args.focus,
    )
    cfg.validate()
    if args.partitions is not None:
        keys_np = load_array(args.keys, name="keys")
        if keys_np.ndim != 2:
            raise InputError(f"keys: expected a 2-D array [n, d], got shape {keys_np.shape}")
        load_partitions(args.partitions, keys_np.shape[0])
    out = check_output_folder(args.out, "out", kind="training run", overwrite=args.overwrite)
    if (out / "config.json").exists() and not (args.resume or args.overwrite):
        raise InputError(f"out: {out} already holds a run; pass --resume to continue it, --overwrite "
                         "to replace it, or choose a new folder")

    def run_in(folder):
        return train(args.keys, args.queries, folder, cfg, labels_dir=args.labels, partitions=args.partitions,
                     device=device, resume=args.resume, progress=not args.quiet)

    # under torchrun: join the process group (gloo on cpu, nccl on cuda) for this command
    with distributed.session(device) as device:
        if distributed.world_size() > 1:
            if args.overwrite:
                raise InputError("overwrite: not supported under torchrun; remove the run folder or "
                                 "choose a new --out")
            metrics = run_in(args.out)
        else:
            with artifact_output(args.out, "out", kind="training run", overwrite=args.overwrite,
                                 command=command_line(args)) as work:
                metrics = run_in(work)
        if distributed.rank() > 0:
            return 0
    cfg_json = json.loads((Path(args.out) / "config.json").read_text())
    print(f"model: {cfg_json['model']['kind']} width {cfg_json['model']['width']} depth "
          f"{cfg_json['model']['depth']} heads {cfg_json['model']['n_heads']}: "
          f"{cfg_json['n_params']:,} params ({cfg_json['param_fraction_of_keys']:.4f} x n_keys*d)")
    print("validation (EMA weights):")
    for k, v in metrics.items():
        if k not in ("split",):
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0
