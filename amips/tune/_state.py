"""The resumable state folder ``OUT/state/``.

- ``fingerprint.json``: what the tune was asked (inputs' fingerprints, target, options).
  A rerun with other inputs or options is refused unless ``overwrite``; the budget is not
  part of it, so a rerun with a larger budget continues where the last one stopped.
- ``points/<sha>.json``: one file per finished operating point, written atomically; a
  rerun loads it instead of measuring again (and takes the same decisions from it).
- ``steps/<sha>.json``: finished steps (a build, a router, a curve) with their seconds.
- ``labels/``: the split and the exact labels, computed once.
- ``builds/``, ``routers/``: index folders and router runs. Their ``index.json`` is parked
  as ``index.json.parked`` whenever the tune is not running, so that the one folder under
  OUT holding an ``index.json`` is the chosen index.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .._io import atomic_write_json
from .._validate import InputError

PARKED = "index.json.parked"


def _sha(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:20]


class State:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.root = self.out / "state"

    # ---------------------------------------------------------------- folder
    def open(self, fingerprint: dict, *, overwrite: bool) -> bool:
        """Create or check the folder; returns True when resuming a previous run."""
        out, fp_path = self.out, self.root / "fingerprint.json"
        if out.exists() and not out.is_dir():
            raise InputError(f"out: {out} exists and is not a folder")
        if out.exists() and any(out.iterdir()) and not fp_path.exists():
            raise InputError(f"out: {out} is not empty and holds no amips tune; choose a new or empty folder")
        if fp_path.exists():
            try:
                old = json.loads(fp_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old != fingerprint:
                if not overwrite:
                    diff = sorted(k for k in set(old or {}) | set(fingerprint)
                                  if (old or {}).get(k) != fingerprint.get(k))
                    raise InputError(f"out: {out} holds a tune of other inputs or options ({', '.join(diff)} "
                                     "differ); pass --overwrite to start again, or choose a new folder")
                self.wipe()
            elif overwrite:
                self.wipe()
        resumed = fp_path.exists()
        (self.root / "points").mkdir(parents=True, exist_ok=True)
        (self.root / "steps").mkdir(parents=True, exist_ok=True)
        atomic_write_json(fp_path, fingerprint)
        return resumed

    def wipe(self) -> None:
        """Remove what a tune writes (and nothing else) from the output folder."""
        for name in ("state", "index", "router"):
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
        for name in ("report.json", "frontier.csv", "points.csv", "frontier.png", "report.txt"):
            (self.out / name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- points and steps
    def point(self, key: str) -> dict | None:
        p = self.root / "points" / f"{_sha(key)}.json"
        if not p.exists():
            return None
        try:
            row = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # cannot happen with atomic writes; measure it again
        return row if row.get("key") == key else None

    def save_point(self, row: dict) -> None:
        atomic_write_json(self.root / "points" / f"{_sha(row['key'])}.json", row)

    def points(self) -> list[dict]:
        rows = []
        for p in sorted((self.root / "points").glob("*.json")):
            try:
                rows.append(json.loads(p.read_text()))
            except json.JSONDecodeError:
                continue
        return rows

    def step(self, key: str) -> dict | None:
        p = self.root / "steps" / f"{_sha(key)}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save_step(self, key: str, info: dict) -> None:
        atomic_write_json(self.root / "steps" / f"{_sha(key)}.json", {"key": key, **info})

    def steps(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.root / "steps").glob("*.json"))]

    # ---------------------------------------------------------------- parked indexes
    def park_all(self) -> None:
        for cfg in (self.root / "builds").glob("*/index.json"):
            cfg.replace(cfg.with_name(PARKED))

    @staticmethod
    def unpark(folder: Path) -> None:
        parked = Path(folder) / PARKED
        if parked.exists():
            parked.replace(Path(folder) / "index.json")
