"""Checkpoints that survive a kill at any moment, and resume that continues exactly.

A checkpoint is a folder `step-000120/` written first as `step-000120.tmp/`, every file fsynced, then renamed:
a rename is atomic, so a folder without `.tmp` is always complete. It holds the trainable weights
(safetensors), the optimizer and scheduler states, the RNG states, the step and the global row reached (batches are
a pure function of the seed and the row number, so a run resumed on another number of processes continues there).
Weights and optimizer states are saved whole, also from a sharded (FSDP) run: every rank gathers, rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError
from lorafit.train import distributed
from lorafit.train.flat import FlatParameters, join_state, split_state

PREFIX = "step-"


def _fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # copies: trainable weights may be views of one flat buffer (train/flat.py), which safetensors will not save
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int = 2,
                    flat: FlatParameters | None = None) -> Path:
    """Every rank calls this (gathering sharded states is collective); rank 0 writes. `flat`: the optimizer steps
    the adapters' flat buffer; its state is written tensor by tensor all the same (train/flat.py)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{PREFIX}{step:06d}.tmp"
    with distributed.full_trainable(model):
        weights = trainable_state(model)
    optimizer_state = distributed.full_optimizer_state(optimizer)
    if flat is not None:
        optimizer_state = split_state(optimizer_state, flat)
    if not distributed.is_main():
        distributed.barrier()  # returns once rank 0 has the checkpoint on disk
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
    except OSError as e:  # disk full, read-only, quota: keep what was there and say so
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise LorafitError(f"cannot write checkpoint {final}: {e.strerror or e}; {kept}") from None
    if final.exists():  # a re-run of the same step (after resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        # rename first: a kill in the middle of rmtree must not leave a half-deleted folder that looks complete
        doomed = old.with_name(old.name + ".tmp")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    distributed.barrier()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
            and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise LorafitError(f"{path}: not a lorafit checkpoint (no meta.json); use --resume auto to find the latest")
    return path


def read_meta(path: Path) -> dict:
    """The checkpoint's step, global row reached, world size and evaluation record."""
    return json.loads((Path(path) / "meta.json").read_text())


def load_checkpoint(path: Path, model, optimizer, scheduler, flat: FlatParameters | None = None) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the checkpoint's meta (step, ...). `flat`: as for
    save_checkpoint."""
    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise LorafitError(f"{path}: checkpoint weights do not match this run's trainable parameters "
                           "(was it made with another model, method or LoRA config?)")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(distributed.shard_like(tensor, params[name]))  # FSDP: this rank's piece
    # weights_only: the state file holds tensors and plain containers only, so nothing in it can run code
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    try:
        saved_state = state["optimizer"] if flat is None else join_state(state["optimizer"], flat, str(path))
        optimizer.load_state_dict(distributed.shard_optimizer_state(optimizer, saved_state))
    except ValueError as e:  # another optimizer, or parameters laid out otherwise than when it was saved
        raise LorafitError(f"{path}: the optimizer state does not fit this run's optimizer ({e}); resume from the "
                           "adapter instead, or start the run again") from None
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "meta.json").read_text())
