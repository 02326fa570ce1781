"""Shared CLI set-up for tests: an index and a multi-head router trained for it."""

from amips.cli import main


def build_index_and_router(root, n_lists: int, *, steps: int, batch_size: int, width: int) -> None:
    """`amips index build` of root/k.npy into root/ix, then a router-mlp trained on
    root/q.npy for those lists into root/run (one hidden layer, no noise, CPU)."""
    assert main(["index", "build", "--keys", str(root / "k.npy"), "--n-lists", str(n_lists),
                 "--out", str(root / "ix"), "--quiet"]) == 0
    assert main(["train", "--keys", str(root / "k.npy"), "--queries", str(root / "q.npy"),
                 "--model", "router-mlp", "--partitions", str(root / "ix" / "partitions.npy"),
                 "--out", str(root / "run"), "--steps", str(steps), "--batch-size", str(batch_size),
                 "--noise", "0", "--device", "cpu", "--quiet", "--width", str(width), "--depth", "1"]) == 0
