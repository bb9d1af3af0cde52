"""lorafit: LoRA and QLoRA fine-tuning of open LLMs on the GPU you have."""

__version__ = "0.1.0"
