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
    """metrics.jsonl, one line per logged step; TensorBoard too when it is installed.

    On resume, lines after the checkpoint's step are dropped so the file shows one continuous curve.
    """

    def __init__(self, output_dir: Path, keep_until_step: int = 0):
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
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])

    @property
    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.history if "loss" in r]
        return losses[-1] if losses else None
