"""`lorafit` command line: a thin shell over the Python API; every command is one library call.

Errors meant for the user (bad config, bad data, missing model) print their message and exit 2: no traceback.
"""

from __future__ import annotations

import sys

import typer

from lorafit.config import field_help, load_config
from lorafit.errors import LorafitError

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open LLMs with LoRA and QLoRA on the GPU you have (or, slowly, the CPU).")


def _fields_help() -> str:
    rows = [f"  --{name:<28} {text} [default: {default}]" for name, text, default in field_help()]
    return "Every config field is also a flag (YAML values, dotted names for sections):\n\n" + "\n\n".join(rows)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Example: lorafit train run.yaml --lora.r 8 --learning-rate 1e-4 --micro-batch-size 2")
def train(ctx: typer.Context, config: str = typer.Argument(None, help="YAML config file (optional)"),
          show_fields: bool = typer.Option(False, "--fields", help="list every config field and exit")):
    """Fine-tune a model: QLoRA (default), LoRA or full. Writes OUT/adapter, OUT/run.json, OUT/metrics.jsonl."""
    if show_fields:
        typer.echo(_fields_help())
        return
    from lorafit.train.loop import train as run_training

    overrides = list(ctx.args)
    if config is not None and config.startswith("--"):  # no config file: the first flag landed in CONFIG
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    result = run_training(cfg)
    typer.echo(f"adapter: {result.artifact_dir}\nrun record: {result.output_dir / 'run.json'}")


@app.command()
def generate(prompt: str = typer.Argument(..., help="user message"),
             adapter: str = typer.Option(None, help="adapter folder written by lorafit train (or any PEFT LoRA)"),
             model: str = typer.Option(None, help="base model (default: the adapter's base, else 'bundled')"),
             system: str = typer.Option(None, help="system message"),
             max_new_tokens: int = typer.Option(256), temperature: float = typer.Option(0.0),
             device: str = typer.Option("auto")):
    """Answer one prompt with the base model or base + adapter, through the chat template.

    Example: lorafit generate --adapter runs/demo/adapter "Started lisinopril 10 mg PO daily."
    """
    from lorafit.infer import answer

    typer.echo(answer(prompt, adapter=adapter, model=model, system=system, max_new_tokens=max_new_tokens,
                      temperature=temperature, device=device))


@app.command()
def plan(model: str = typer.Option("qwen2.5-7b", help="preset name (lorafit plan --fits lists them) or a local folder"),
         method: str = typer.Option("qlora", help="qlora, lora or full"),
         seq: int = typer.Option(2048, help="tokens per row"), batch: int = typer.Option(1, help="rows per micro-batch"),
         gpu: str = typer.Option("24GB", help="card name (rtx4070, t4, a100-80gb, h100...) or a size (12GB)"),
         fits: bool = typer.Option(False, "--fits", help="every preset and method on this card, longest sequence"),
         checkpointing: bool = typer.Option(True, help="gradient checkpointing"),
         grad_accum: int = typer.Option(1), lora_r: int = typer.Option(16), packed: bool = typer.Option(False)):
    """Where the GPU memory of a run goes, whether it fits the card, and the fastest settings that do.

    Example: lorafit plan --model qwen2.5-7b --seq 2048 --batch 4 --gpu rtx4090
    """
    from lorafit.plan import plan_command

    plan_command(model=model, method=method, seq=seq, batch=batch, gpu=gpu, fits=fits, checkpointing=checkpointing,
                 grad_accum=grad_accum, lora_r=lora_r, packed=packed)


@app.command("eval")
def eval_command(data: str = typer.Option(..., help="held-out file (.jsonl/.json/.parquet/.csv, any training format)"),
                 model: str = typer.Option(None, help="base model (default: the adapter's base, else 'bundled')"),
                 adapter: str = typer.Option(None, help="adapter folder; without it the base model is scored"),
                 metrics: str = typer.Option("", help="comma list: json, exact_match, classification, rouge, bleu, "
                                                      "or module:function"),
                 max_examples: int = typer.Option(0, help="score only the first N examples (0: all)"),
                 max_new_tokens: int = typer.Option(256), batch_size: int = typer.Option(16),
                 output_dir: str = typer.Option(None, help="write OUT/eval/*_predictions.jsonl and scores"),
                 system: str = typer.Option(None, help="system message for records without one"),
                 device: str = typer.Option("auto")):
    """Score a model (or base + adapter): target-token loss and perplexity, plus generation metrics.

    Example: lorafit eval --adapter runs/demo/adapter --data runs/demo/data/medication_test.jsonl --metrics json
    """
    from lorafit.eval.evaluate import evaluate_model
    from lorafit.eval.report import print_scores

    scores = evaluate_model(data, model=model, adapter=adapter, metrics=[m for m in metrics.split(",") if m],
                            max_examples=max_examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            output_dir=output_dir, device=device, system_prompt=system)
    print_scores(scores)


@app.command()
def merge(adapter: str = typer.Argument(..., help="adapter folder"), out: str = typer.Argument(..., help="new folder"),
          dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32"),
          base: str = typer.Option(None, help="original (the checkpoint's 16-bit weights) or nf4 (the NF4-rounded "
                                              "weights a QLoRA adapter trained against) [default: nf4 for QLoRA]"),
          model: str = typer.Option(None, help="base model folder (default: the adapter's base)"),
          shard_size_gb: float = typer.Option(2.0, help="largest output shard")):
    """Merge an adapter into its base: a Hugging Face folder transformers, vLLM and SGLang load as it is.

    Streams shard by shard (peak memory about two shards). Example: lorafit merge runs/x/adapter runs/x/merged
    """
    from lorafit.export.merge import merge_adapter
    from lorafit.infer import adapter_base_and_method

    if base is None:
        base = "nf4" if adapter_base_and_method(adapter)[1] == "qlora" else "original"
    path = merge_adapter(adapter, out, dtype=dtype, base=base, model=model, shard_size=int(shard_size_gb * 1e9))
    typer.echo(f"merged ({base} base, {dtype}): {path}")


@app.command()
def export(model_dir: str = typer.Argument(..., help="Hugging Face model folder (e.g. from lorafit merge)"),
           out: str = typer.Argument(..., help="output .gguf file"),
           type: str = typer.Option("f16", "--type", help="f16 or q8_0")):  # noqa: A002 -- the flag's name
    """Write a model folder as GGUF for llama.cpp. Example: lorafit export runs/x/merged model.gguf --type q8_0"""
    from lorafit.export.gguf import export_gguf

    typer.echo(f"gguf: {export_gguf(model_dir, out, type=type)}")


@app.command()
def demo(task: str = typer.Option("medication", help="medication (JSON extraction) or intents (classification)"),
         output_dir: str = typer.Option(None, help="where data, adapter and reports go [default: runs/demo-TASK]"),
         max_steps: int = typer.Option(0, help="override the demo's step count (0: the tuned default)"),
         device: str = typer.Option("auto")):
    """The bundled example: SmolLM2-135M-Instruct evaluated, fine-tuned with QLoRA, and evaluated again.

    Runs in under 15 minutes on a 2-core CPU; much faster on a GPU. Example: lorafit demo --task intents
    """
    from lorafit.demo import run_demo

    run_demo(output_dir=output_dir or f"runs/demo-{task}", task=task, max_steps=max_steps, device=device)


COMMANDS = {"train": train, "plan": plan, "generate": generate, "eval": eval_command, "merge": merge,
            "export": export, "demo": demo}


def main(argv: list[str] | None = None) -> None:
    from lorafit.train.faults import Interrupted

    try:
        app(args=argv, standalone_mode=False)
    except Interrupted as e:
        typer.secho(f"stopped: {e}", fg="yellow", err=True)
        sys.exit(130)
    except LorafitError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors arrive here with standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
