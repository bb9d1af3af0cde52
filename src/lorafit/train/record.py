"""What a run leaves behind besides weights: a JSONL metrics log, run.json, and the facts that identify the run."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def data_fingerprint(path: str | None) -> dict | None:
    """sha256 over the bytes of the data file(s): two runs with the same fingerprint saw the same data."""
    if not path:
        return None
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(p), "sha256": digest.hexdigest(), "files": len(files)}


def library_versions() -> dict:
    out = {}
    for name in ("lorafit", "torch", "transformers", "peft", "bitsandbytes", "safetensors", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class MetricsLog:
    """metrics.jsonl, one line per logged step; the scalars also go to the trackers of `report_to`, if any.

    On resume, lines after the checkpoint's step are dropped so the file shows one continuous curve.
    """

    def __init__(self, output_dir: Path, keep_until_step: int = 0, trackers=None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.history: list[dict] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= keep_until_step and keep_until_step > 0:
                    self.history.append(row)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.trackers = trackers  # lorafit.train.trackers.Trackers

    def write(self, row: dict) -> None:
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row["step"], row)

    @property
    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.history if "loss" in r]
        return losses[-1] if losses else None


def peak_cpu_memory_gb() -> float:
    """Peak resident memory of this process so far (the CPU twin of torch.cuda.max_memory_allocated)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux
