"""How fast does a SupportNet run? amips fused ICNN kernels vs torch eager vs torch.compile.

Two workloads per (batch, width), depth 8, d = 384, one head:
- ``fwd+key``: f(q) and the key grad_q f(q) (inference / key recovery; no parameter grads).
- ``train``: one full training step on the score + key loss: forward, key with
  ``create_graph=True``, loss, backward through the key (double backward), AdamW step.

Providers: ``amips`` (SupportNet with the fused Triton layers, ``kernels/icnn.py``),
``torch-eager`` (the same network through the plain torch reference layers) and
``torch-compile`` (the reference model under ``torch.compile``; inductor does not support
double backward, so its ``train`` rows record the failure instead of a number).
Throughput is samples/s: median of ``triton.testing.do_bench`` on CUDA, best of several
wall-clock repeats on CPU. Without CUDA the Triton kernels are not run (the interpreter is
a correctness tool, not a speed one): ``amips`` then IS the torch path and is reported as
such; the CPU quick run only checks the harness and gives CPU figures.

    python bench/bench_icnn.py            # full grid on CUDA (batch 4096/16384/65536 x width 512/1024/2048)
    python bench/bench_icnn.py --quick    # CUDA: batch 4096, width 1024; CPU: batch 512, width 256
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, device_name, git_sha  # noqa: E402

OUT = ROOT / "bench" / "out"


def make_workloads(provider: str, batch: int, width: int, depth: int, d: int, device: str, bf16: bool):
    from amips.models import SupportNet

    torch.manual_seed(0)
    net = SupportNet(d, width=width, depth=depth, use_kernels=(provider == "amips")).to(device)
    fwd_model = net
    if provider == "torch-compile":
        try:  # donated buffers forbid create_graph=True in the backward of a compiled graph
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
        except (ImportError, AttributeError):
            pass
        fwd_model = torch.compile(net)
    q = torch.nn.functional.normalize(torch.randn(batch, d, device=device), dim=1)
    s_star = torch.rand(batch, device=device)
    k_star = torch.nn.functional.normalize(torch.randn(batch, d, device=device), dim=1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16 and device == "cuda")

    def fwd_key():
        qq = q.detach().requires_grad_(True)
        with amp:
            f = fwd_model(qq)
        (key,) = torch.autograd.grad(f.sum(), qq)
        return key

    def train_step():
        qq = q.detach().requires_grad_(True)
        with amp:
            f = fwd_model(qq)[:, 0].float()
        (key,) = torch.autograd.grad(f.sum(), qq, create_graph=True)
        loss = ((f - s_star) ** 2).mean() + ((key.float() - k_star) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return {"fwd+key": fwd_key, "train": train_step}


def time_fn(fn, device: str, repeats: int) -> float:
    """Seconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up (and compilation)
    return best_of(fn, repeats)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA instead of bf16 autocast")
    ap.add_argument("--providers", default="amips,torch-eager,torch-compile")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("no GPU: CPU run; the amips provider runs the torch path (Triton needs CUDA)")
        batches, widths = ([512], [256]) if args.quick else ([1024, 4096], [256, 512])
    else:
        batches, widths = ([4096], [1024]) if args.quick else ([4096, 16384, 65536], [512, 1024, 2048])
    bf16 = not args.no_bf16
    OUT.mkdir(parents=True, exist_ok=True)
    sha, dev_name = git_sha(), device_name(device)
    rows = []
    for batch in batches:
        for width in widths:
            for provider in args.providers.split(","):
                try:
                    works = make_workloads(provider, batch, width, args.depth, args.d, device, bf16)
                except Exception as exc:  # pragma: no cover - depends on the install
                    print(f"{provider}: cannot build ({type(exc).__name__}: {exc})")
                    continue
                for name, fn in works.items():
                    try:
                        sec = time_fn(fn, device, args.repeats)
                        value, note = batch / sec, ""
                    except Exception as exc:
                        value, note = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    rows.append(dict(bench="icnn", provider=provider, batch=batch, width=width,
                                     depth=args.depth, d=args.d, workload=name,
                                     metric="samples_per_s", value=value, note=note,
                                     dtype="bf16" if (bf16 and device == "cuda") else "fp32",
                                     device=dev_name, git_sha=sha))
                    print(f"  {provider:14s} {name:8s} batch {batch:6d} width {width:5d}: "
                          + (f"{value:12,.0f} samples/s" if note == "" else f"failed ({note})"), flush=True)
    csv_path = OUT / "icnn.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, work in zip(axes, ("fwd+key", "train")):
            confs = sorted({(r["batch"], r["width"]) for r in rows})
            provs = sorted({r["provider"] for r in rows})
            for j, p in enumerate(provs):
                vals = [next((r["value"] for r in rows if r["provider"] == p and r["workload"] == work
                              and (r["batch"], r["width"]) == c), float("nan")) for c in confs]
                ax.bar([i + 0.25 * j for i in range(len(confs))], vals, width=0.25, label=p)
            ax.set_xticks([i + 0.25 for i in range(len(confs))], [f"B{b}\nW{w}" for b, w in confs])
            ax.set_title(f"{work} (depth {args.depth}, d {args.d}, {device})")
            ax.set_ylabel("samples/s")
            ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "icnn.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"\nwrote {csv_path}")
    print(f"{'provider':14s} {'workload':8s} {'batch':>6s} {'width':>5s} {'samples/s':>12s} {'vs eager':>8s}")
    for r in rows:
        eager = next((x["value"] for x in rows if x["provider"] == "torch-eager" and x["workload"] == r["workload"]
                      and x["batch"] == r["batch"] and x["width"] == r["width"]), float("nan"))
        print(f"{r['provider']:14s} {r['workload']:8s} {r['batch']:6d} {r['width']:5d} "
              f"{r['value']:12,.0f} {r['value'] / eager:8.2f}" + (f"  {r['note']}" if r["note"] else ""))


if __name__ == "__main__":
    main()
