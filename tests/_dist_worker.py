"""One rank of the distributed tests (launched by tests/test_distributed.py with torchrun).

Runs every scenario in one process group, in the same order on every rank, and writes
what it saw under OUT/rank<r>.json (errors caught, so a failing check cannot hang).
Usage: python tests/_dist_worker.py CASE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from amips import distributed
from amips._validate import InputError
from amips.index.ivf import IVFIndex
from amips.index.sharded import ShardedIVFIndex
from amips.labels import run_label_job
from amips.train import TrainConfig, train


def main(case: Path, out: Path) -> None:
    spec = json.loads((case / "spec.json").read_text())
    seen: dict = {"errors": {}}
    with distributed.session("cpu"):
        r = distributed.rank()
        seen["rank"], seen["world_size"] = r, distributed.world_size()
        for name, kw in spec["labels"].items():
            run_label_job(case / "keys.npy", case / "queries.npy", out / f"labels_{name}", progress=False,
                          partitions_path=case / "partitions.npy" if kw.pop("partitions", False) else None, **kw)

        def expect_error(name, fn):
            try:
                fn()
                seen["errors"][name] = None
            except InputError as exc:
                seen["errors"][name] = str(exc)

        expect_error("mismatched", lambda: run_label_job(
            case / "keys.npy", case / "queries.npy", out / "bad_mismatch", topk=3 + r, progress=False))
        expect_error("too_few_keys", lambda: run_label_job(
            case / "one_key.npy", case / "queries.npy", out / "bad_few", progress=False))
        expect_error("batch_not_multiple", lambda: train(
            case / "keys.npy", case / "queries.npy", out / "bad_batch",
            TrainConfig(**{**spec["train"]["keynet"], "batch_size": 33}), progress=False))

        expect_error("train_mismatched", lambda: train(
            case / "keys.npy", case / "queries.npy", out / "bad_train",
            TrainConfig(**{**spec["train"]["keynet"], "steps": 6 + r}), progress=False))
        for name, cfg in spec["train"].items():
            train(case / "keys.npy", case / "queries.npy", out / f"train_{name}", TrainConfig(**cfg),
                  partitions=case / "partitions.npy" if name != "keynet" else None, progress=False)
        # found by rank 0 alone (it alone reads the run folder), raised on every rank
        expect_error("existing_run", lambda: train(
            case / "keys.npy", case / "queries.npy", out / "train_keynet",
            TrainConfig(**spec["train"]["keynet"]), progress=False))
        train(case / "keys.npy", case / "queries.npy", case / "resume_run", TrainConfig(**spec["resume"]),
              resume=True, progress=False)

        index = IVFIndex.load(case / "index")
        sharded = ShardedIVFIndex(index)
        seen["owned_lists"] = int(sharded.owned.sum())
        seen["keys_equal"] = bool(torch.equal(sharded.keys(), index.keys()))
        results = {}
        for nprobe in spec["nprobes"]:
            s, i = sharded.search(torch.from_numpy(np.load(case / "queries.npy")), spec["k"], nprobe)
            results[f"scores_{nprobe}"], results[f"ids_{nprobe}"] = s.numpy(), i.numpy()
        np.savez(out / f"search_rank{r}.npz", **results)
    (out / f"rank{r}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
