"""README.md for an adapter folder: which base, which data, what it scored, and how to serve it.

The folder stays a plain PEFT adapter (vLLM and SGLang read adapter_config.json and adapter_model.safetensors and
ignore the README); the README is for the person who finds the folder later, and for the Hub's model card, whose
front matter (`library_name: peft`, `base_model`) it follows.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.model.lora import ADAPTER_CONFIG

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _data_line(fingerprint: dict | None, report: dict | None) -> str:
    if not fingerprint:
        return "none"
    line = f"`{fingerprint.get('path')}` (sha256 `{fingerprint.get('sha256')}`, {fingerprint.get('files')} file(s))"
    if report:
        line += f"; {report.get('examples')} examples of {report.get('records')} records"
    return line


def _metric_rows(metrics: dict) -> list[str]:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = [k for k in {**before, **after} if isinstance(before.get(k, after.get(k)), (int, float))]
    return [f"| {name} | {_fmt(before.get(name, '-'))} | {_fmt(after.get(name, '-'))} |" for name in names]


def write_adapter_readme(folder: str | Path, run_info: dict) -> Path:
    """Write `folder`/README.md from run.json's content (`run_info`); returns its path. Missing fields are skipped."""
    folder = Path(folder)
    config = run_info.get("config") or {}
    base = run_info.get("base_model") or {}
    data = run_info.get("data") or {}
    adapter_cfg = {}
    if (folder / ADAPTER_CONFIG).is_file():
        adapter_cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    lora = config.get("lora") or {}
    method = config.get("method", "lora")
    base_path = base.get("path") or adapter_cfg.get("base_model_name_or_path") or "unknown"
    rank = adapter_cfg.get("r", lora.get("r"))
    targets = adapter_cfg.get("target_modules") or lora.get("target_modules") or []

    lines = ["---", "library_name: peft", f"base_model: {base_path}", "tags:", "- lorafit", f"- {method}", "---", "",
             f"# {folder.name}: a {'QLoRA' if method == 'qlora' else 'LoRA'} adapter trained with lorafit", "",
             "| | |", "|---|---|", f"| base model | `{base_path}` |"]
    for key, label in (("config_json_sha256", "base config.json sha256"),
                       ("model_safetensors_index_json_sha256", "base weight index sha256")):
        if base.get(key):
            lines.append(f"| {label} | `{base[key]}` |")
    if base.get("weight_files"):
        files = ", ".join(f"{name} ({size:,} bytes)" for name, size in base["weight_files"].items())
        lines.append(f"| base weight files | {files} |")
    nf4_note = " (adapter trained against the NF4-quantized base)" if method == "qlora" else ""
    lines += [f"| method | {method}{nf4_note} |",
              f"| rank / alpha | {rank} / {adapter_cfg.get('lora_alpha', lora.get('alpha'))}"
              + (" (rsLoRA)" if adapter_cfg.get("use_rslora", lora.get("use_rslora")) else "") + " |",
              f"| target modules | {', '.join(sorted(targets))} |",
              f"| training data | {_data_line(data.get('train'), data.get('train_report'))} |",
              f"| validation data | {_data_line(data.get('val'), data.get('val_report'))} |"]
    for key, label in (("steps", "optimizer steps"), ("final_train_loss", "final training loss")):
        if run_info.get(key) is not None:
            lines.append(f"| {label} | {_fmt(run_info[key])} |")
    for key, label in (("learning_rate", "learning rate"), ("epochs", "epochs"), ("seed", "seed")):
        if key in config:
            lines.append(f"| {label} | {_fmt(config[key])} |")

    rows = _metric_rows(run_info.get("metrics") or {})
    if rows:
        lines += ["", "## Held-out metrics", "", "| metric | base model | fine-tuned |", "|---|---|---|", *rows]

    # vLLM accepts only these --max-lora-rank values; the flag must be at least the adapter's rank
    rank_flag = next((v for v in VLLM_RANKS if v >= int(rank or 16)), int(rank or 16))
    lines += ["", "## Use", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base_path}")',
              f'model = PeftModel.from_pretrained(base, "{folder}")', "```", "", "```bash",
              f"vllm serve {base_path} --enable-lora --lora-modules {folder.name}={folder} --max-lora-rank {rank_flag}",
              f"python -m sglang.launch_server --model-path {base_path} --lora-paths {folder.name}={folder}",
              f"lorafit merge {folder} merged/   # one model folder, no adapter at serving time", "```"]
    if method == "qlora":
        lines += ["", "This adapter was fitted to the NF4-rounded base weights. Served on the 16-bit base (vLLM, "
                  "SGLang, PEFT as above) its outputs differ slightly from training's; "
                  "`lorafit.export.merge.merge_fidelity` measures by how much, and "
                  "`merge_adapter(..., base=\"nf4\")` merges into the weights it saw."]
    versions = run_info.get("versions") or {}
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items() if v)]
    path = folder / "README.md"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
