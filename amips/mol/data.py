"""Implicit feedback from a ratings file, ordered per user, split leave-last-out.

Input: a CSV with a header naming at least ``userId``, ``movieId`` and ``timestamp`` (the
MovieLens layout ``userId,movieId,rating,timestamp``; ``rating`` is read as implicit
feedback, so every row counts as one interaction whatever its value). Ids are integers.

Each user's interactions are ordered by time; rows with the same timestamp keep their order
in the file (a stable sort), so the split never depends on the sort algorithm. Leave-last-out:
the last interaction of every user is the test target, the one before it the validation
target, everything before that is training history. A user needs at least 3 interactions.

Items get internal indices ``0 .. n_items-1`` in increasing order of their external id
(``item_ids[i]`` is the id in the file); users likewise (``user_ids``). Sequences are stored
as one flat array with offsets (CSR), in internal item indices.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._validate import InputError

REQUIRED_COLUMNS = ("userId", "movieId", "timestamp")
MIN_INTERACTIONS = 3


@dataclass
class Interactions:
    """Per-user, time-ordered interaction sequences (internal item indices, CSR layout)."""

    user_ids: np.ndarray  # [n_users] int64, external ids, increasing
    item_ids: np.ndarray  # [n_items] int64, external ids, increasing
    offsets: np.ndarray  # [n_users + 1] int64
    items: np.ndarray  # [n_interactions] int64, internal item index

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    def sequence(self, u: int) -> np.ndarray:
        """Internal user index -> its full time-ordered item sequence."""
        return self.items[self.offsets[u]:self.offsets[u + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_index(self, user_ids, name: str = "user_ids") -> np.ndarray:
        """External user ids -> internal indices; unknown ids raise InputError naming ``name``."""
        return _lookup(self.user_ids, user_ids, name, "user")

    def item_index(self, item_ids, name: str = "item_ids") -> np.ndarray:
        return _lookup(self.item_ids, item_ids, name, "item")

    # --- leave-last-out views -------------------------------------------------------------
    def history(self, u: int, split: str) -> np.ndarray:
        """Items before the target of ``split`` ("train": all but the last two, "validation":
        all but the last two, the target being the second last; "test": all but the last)."""
        s = self.sequence(u)
        if split == "test":
            return s[:-1]
        if split in ("validation", "train"):
            return s[:-2]
        raise InputError(f"split: expected 'train', 'validation' or 'test', got {split!r}")

    def target(self, u: int, split: str) -> int:
        s = self.sequence(u)
        if split == "test":
            return int(s[-1])
        if split == "validation":
            return int(s[-2])
        raise InputError(f"split: expected 'validation' or 'test', got {split!r}")


def _lookup(table: np.ndarray, ids, name: str, kind: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InputError(f"{name}: expected a 1-D list of {kind} ids, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name}: is empty")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"{name}: expected integer {kind} ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    pos = np.searchsorted(table, arr)
    pos_c = np.minimum(pos, len(table) - 1)
    bad = table[pos_c] != arr
    if bad.any():
        missing = arr[bad][:5].tolist()
        raise InputError(f"{name}: unknown {kind} id(s) {missing} (not in the ratings the model was trained on)")
    return pos_c


def _parse_int(text: str, column: str, line: int, path: Path) -> int:
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and np.isfinite(value) and value == int(value):
            return int(value)
        raise InputError(
            f"ratings: {path}, line {line}: column {column!r} must be an integer id, got {text!r}"
        ) from None


def read_ratings(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (users, items, timestamps) from a MovieLens-layout CSV, with clear errors."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"ratings: no such file: {p}")
    if p.is_dir():
        raise InputError(f"ratings: {p} is a folder; expected a CSV file (userId,movieId,rating,timestamp)")
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"ratings: {p} is empty (expected a header userId,movieId,rating,timestamp)") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"ratings: cannot read {p} as CSV: {exc}") from None
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise InputError(
                f"ratings: {p} lacks column(s) {missing}; header is {header} "
                "(expected the MovieLens layout userId,movieId,rating,timestamp)"
            )
        iu, ii, it = (header.index(c) for c in REQUIRED_COLUMNS)
        need = max(iu, ii, it) + 1
        users, items, stamps = [], [], []
        try:
            for line, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) < need:
                    raise InputError(f"ratings: {p}, line {line}: expected {len(header)} columns, got {len(row)}")
                users.append(_parse_int(row[iu].strip(), "userId", line, p))
                items.append(_parse_int(row[ii].strip(), "movieId", line, p))
                t = row[it].strip()
                try:
                    tv = float(t)
                except ValueError:
                    raise InputError(f"ratings: {p}, line {line}: column 'timestamp' must be a number, got {t!r}") from None
                if not np.isfinite(tv):
                    raise InputError(f"ratings: {p}, line {line}: column 'timestamp' is not finite ({t!r})")
                stamps.append(tv)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"ratings: cannot read {p} as CSV: {exc}") from None
    if not users:
        raise InputError(f"ratings: {p} has a header but no rows")
    return (np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64),
            np.asarray(stamps, dtype=np.float64))


def build_interactions(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    *,
    item_ids: np.ndarray | None = None,
    drop_short: bool = False,
    min_interactions: int = MIN_INTERACTIONS,
) -> Interactions:
    """Group rows by user, order each user's rows by (timestamp, row order), map ids.

    ``item_ids`` fixes the item vocabulary (a trained model's); rows with other items raise.
    Users with fewer than ``min_interactions`` rows raise, or are dropped with ``drop_short``.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if not (len(users) == len(items) == len(timestamps)):
        raise InputError("ratings: users, items and timestamps differ in length")
    if len(users) == 0:
        raise InputError("ratings: no interactions")
    # Stable: rows with equal (user, timestamp) keep file order.
    order = np.lexsort((np.arange(len(users)), timestamps, users))
    users, items = users[order], items[order]
    uids, starts, counts = np.unique(users, return_index=True, return_counts=True)
    short = counts < min_interactions
    if short.any():
        if not drop_short:
            ex = ", ".join(f"user {int(u)} has {int(c)}" for u, c in zip(uids[short][:3], counts[short][:3]))
            raise InputError(
                f"ratings: {int(short.sum())} user(s) have too little history for leave-last-out "
                f"(needs >= {min_interactions} interactions: training, validation, test): {ex}; "
                "drop them with --drop-short-users (drop_short=True)"
            )
        keep = np.repeat(~short, counts)
        users, items = users[keep], items[keep]
        if len(users) == 0:
            raise InputError(f"ratings: no user has >= {min_interactions} interactions")
        uids, starts, counts = np.unique(users, return_index=True, return_counts=True)
    if item_ids is None:
        item_ids = np.unique(items)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    internal = _lookup(item_ids, items, "ratings", "item")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Interactions(user_ids=uids.astype(np.int64), item_ids=item_ids, offsets=offsets, items=internal)


def load_interactions(path: str | os.PathLike, *, item_ids: np.ndarray | None = None,
                      drop_short: bool = False) -> Interactions:
    users, items, stamps = read_ratings(path)
    return build_interactions(users, items, stamps, item_ids=item_ids, drop_short=drop_short)


def generate_ratings(
    path: str | os.PathLike | None = None,
    *,
    n_users: int = 200,
    n_items: int = 300,
    min_len: int = 8,
    max_len: int = 40,
    n_clusters: int = 6,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic sequential feedback with learnable structure; optionally written as a CSV.

    Items form ``n_clusters`` groups and each group a ring; a user walks around the ring of
    one group (mostly one step ahead, sometimes a random jump inside the group, rarely a
    switch of group), so the next item is predictable from the last few. Ids are sparse
    (items ``10 * i + 3``, users ``7 * u + 1``) to exercise the id mapping.
    """
    rng = np.random.default_rng(seed)
    cluster = np.arange(n_items) % n_clusters
    members = [np.nonzero(cluster == c)[0] for c in range(n_clusters)]
    users, items, stamps = [], [], []
    for u in range(n_users):
        length = int(rng.integers(min_len, max_len + 1))
        c = int(rng.integers(n_clusters))
        pos = int(rng.integers(len(members[c])))
        t = 1_000_000 + int(rng.integers(0, 1000))
        for _ in range(length):
            users.append(7 * u + 1)
            items.append(10 * int(members[c][pos]) + 3)
            stamps.append(t)
            r = rng.random()
            if r < 0.8:
                pos = (pos + 1) % len(members[c])
            elif r < 0.95:
                pos = int(rng.integers(len(members[c])))
            else:
                c = int(rng.integers(n_clusters))
                pos = int(rng.integers(len(members[c])))
            t += int(rng.integers(1, 100))
    users_a = np.asarray(users, dtype=np.int64)
    items_a = np.asarray(items, dtype=np.int64)
    stamps_a = np.asarray(stamps, dtype=np.int64)
    if path is not None:
        perm = rng.permutation(len(users_a))  # rows out of time order: the loader must sort
        lines = ["userId,movieId,rating,timestamp"]
        lines += [f"{users_a[i]},{items_a[i]},{1 + (i % 5)}.0,{stamps_a[i]}" for i in perm]
        Path(path).write_text("\n".join(lines) + "\n")
    return users_a, items_a, stamps_a.astype(np.float64)
