"""Save a fully fine-tuned model as a Hugging Face folder that transformers loads as it is."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def save_full_model(model, tokenizer, folder: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as transformers expects
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
