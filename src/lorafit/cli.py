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
          show_fields: bool = typer.Option(False, "--fields", help="list every config field and exit"),
          gpus: int = typer.Option(1, "--gpus", help="processes on this machine, one per GPU, through torchrun "
                                                     "(micro_batch_size is per GPU); several machines: torchrun "
                                                     "--nnodes ... -m lorafit train CONFIG")):
    """Fine-tune a model: QLoRA (default), LoRA or full. Writes OUT/adapter, OUT/run.json, OUT/metrics.jsonl."""
    if show_fields:
        typer.echo(_fields_help())
        return
    from lorafit.train import distributed
    from lorafit.train.loop import train as run_training

    overrides = list(ctx.args)
    if config is not None and config.startswith("--"):  # no config file: the first flag landed in CONFIG
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)  # a bad config stops here, before any process starts
    if gpus > 1 and not distributed.launched():
        sys.exit(distributed.launch(gpus, ([config] if config else []) + overrides, cfg.device))
    result = run_training(cfg)
    if distributed.env_rank() == 0:
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
         seq: int = typer.Option(2048, help="tokens per row"),
         batch: int = typer.Option(1, help="rows per micro-batch"),
         gpu: str = typer.Option("24GB", help="card name (rtx4070, t4, a100-80gb, h100...) or a size (12GB)"),
         fits: bool = typer.Option(False, "--fits", help="every preset and method on this card, longest sequence"),
         checkpointing: bool = typer.Option(True, help="gradient checkpointing"),
         grad_accum: int = typer.Option(1), lora_r: int = typer.Option(16), packed: bool = typer.Option(False),
         stream: str = typer.Option("auto", help="QLoRA layer streaming from CPU memory: auto (when nothing fits "
                                                 "resident), on or off"),
         gpus: int = typer.Option(1, help="GPUs the run is spread over: the table is then per GPU, BATCH per GPU"),
         strategy: str = typer.Option("auto", help="with --gpus: ddp (whole model on each GPU), fsdp (sharded) or "
                                                   "auto (ddp when it fits)")):
    """Where the GPU memory of a run goes, whether it fits the card, and the fastest settings that do.

    Example: lorafit plan --model qwen2.5-7b --seq 2048 --batch 4 --gpu rtx4090
    """
    from lorafit.plan import plan_command

    plan_command(model=model, method=method, seq=seq, batch=batch, gpu=gpu, fits=fits, checkpointing=checkpointing,
                 grad_accum=grad_accum, lora_r=lora_r, packed=packed, stream=stream, gpus=gpus, strategy=strategy)


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
def quantize(model_dir: str = typer.Argument(..., help="Hugging Face model folder (16-bit safetensors)"),
             out: str = typer.Argument(..., help="new folder for the NF4 checkpoint"),
             device: str = typer.Option("auto", help="where to quantize: auto (cuda if present), cuda or cpu"),
             dtype: str = typer.Option("auto", help="cast before quantizing, as training does: auto (bf16 on "
                                                    "cuda, fp32 on cpu), bf16 or fp32"),
             shard_size_gb: float = typer.Option(4.0, help="largest output shard")):
    """Write a model with its decoder linears already in NF4: a quarter of the disk, and QLoRA loads it directly.

    Example: lorafit quantize /models/Llama-3.1-70B /models/Llama-3.1-70B-nf4 (then model.path: the new folder)
    """
    from lorafit.model.nf4_checkpoint import quantize_checkpoint

    typer.echo(f"nf4 checkpoint: {quantize_checkpoint(model_dir, out, device, dtype, int(shard_size_gb * 1e9))}")


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


@app.command()
def report(run_dir: str = typer.Argument(..., help="a run's output folder (OUT of lorafit train)"),
           out: str = typer.Option(None, help="HTML file to write (default: RUN_DIR/report.html)"),
           samples: int = typer.Option(10, help="held-out answers shown side by side")):
    """One self-contained HTML page about a run: loss, metric, learning-rate, throughput and memory curves, the
    base/best/final table, base vs fine-tuned answers, warnings and the config. Plots are also saved as PNG.

    Example: lorafit report runs/demo-medication
    """
    from lorafit.report import write_report

    typer.echo(f"report: {write_report(run_dir, out, samples)}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Example: lorafit sweep run.yaml --param learning_rate=1e-4,2e-4 --param lora.r=8,16 --epochs 1")
def sweep(ctx: typer.Context, config: str = typer.Argument(..., help="YAML config every trial starts from"),
          param: list[str] = typer.Option(..., "--param", help="KEY=V1,V2 (values) or KEY=LO:HI (a range, needs "
                                                              "--trials); repeat for each key"),
          trials: int = typer.Option(0, help="0: every combination of the listed values; N: N trials chosen by "
                                              "optuna's TPE sampler"),
          metric: str = typer.Option(None, help="score to optimise (default: the config's eval.best_metric); lower "
                                                "is better for losses and perplexity, higher otherwise"),
          output_dir: str = typer.Option(None, help="trials go to DIR/trial-NNN (default: the config's output_dir)")):
    """Train CONFIG once per setting, in its own folder, and keep the best: a results table, sweep.json and
    best_config.yaml. Other flags (--max-steps 50, --data.max-length 512) apply to every trial."""
    from lorafit.sweep import run_sweep

    run_sweep(config, param, trials=trials, metric=metric, output_dir=output_dir, overrides=list(ctx.args))


data_app = typer.Typer(no_args_is_help=True, help="Look at training data as the trainer sees it: token lengths against "
                                                  "max_length, duplicates, balance, and which tokens carry loss.")
app.add_typer(data_app, name="data")
_DATA_OPTIONS = dict(
    model=typer.Option("bundled", help="model folder, .gguf file or 'bundled': its tokenizer and chat template"),
    max_length=typer.Option(2048, help="data.max_length of the run"),
    fmt=typer.Option("auto", "--format", help="auto, messages, prompt_completion, alpaca or text (data.format)"),
    overlong=typer.Option("truncate", help="truncate or drop (data.overlong)"),
    loss_on=typer.Option("assistant", help="assistant or all (data.loss_on)"),
    system_prompt=typer.Option(None, help="system message for records without one (data.system_prompt)"),
)


@data_app.command("stats")
def data_stats_command(file: str = typer.Argument(..., help="data file or folder (.jsonl/.json/.parquet/.csv)"),
                       model: str = _DATA_OPTIONS["model"], max_length: int = _DATA_OPTIONS["max_length"],
                       fmt: str = _DATA_OPTIONS["fmt"], overlong: str = _DATA_OPTIONS["overlong"],
                       loss_on: str = _DATA_OPTIONS["loss_on"], system_prompt: str = _DATA_OPTIONS["system_prompt"],
                       skip_bad: bool = typer.Option(False, "--skip-bad", help="count malformed records instead of "
                                                                               "stopping at the first"),
                       near: float = typer.Option(0.9, help="shingle Jaccard similarity from which two records are "
                                                            "near duplicates"),
                       as_json: bool = typer.Option(False, "--json", help="print the numbers as JSON, for scripts")):
    """How many examples, how long in tokens (a histogram against max_length), what training would truncate or
    drop, exact and near duplicates, and the balance of answers (classification-like data) and roles.

    Tokenized by the trainer's own code, so the counts are the ones `lorafit train` reports.
    Example: lorafit data stats data/train.jsonl --max-length 512
    """
    from lorafit.data.inspect import data_stats

    stats = data_stats(file, model=model, max_length=max_length, format=fmt, overlong=overlong, loss_on=loss_on,
                       system_prompt=system_prompt, skip_bad=skip_bad, near_threshold=near)
    if as_json:
        import json

        typer.echo(json.dumps(stats.to_dict(), indent=1))
        return
    from lorafit.data.show import print_stats

    print_stats(stats)


@data_app.command("preview")
def data_preview_command(file: str = typer.Argument(..., help="data file or folder (.jsonl/.json/.parquet/.csv)"),
                         n: int = typer.Option(3, "-n", help="examples shown"),
                         model: str = _DATA_OPTIONS["model"], max_length: int = _DATA_OPTIONS["max_length"],
                         fmt: str = _DATA_OPTIONS["fmt"], overlong: str = _DATA_OPTIONS["overlong"],
                         loss_on: str = _DATA_OPTIONS["loss_on"],
                         system_prompt: str = _DATA_OPTIONS["system_prompt"],
                         plain: bool = typer.Option(False, "--plain", help="mark loss tokens ⟦ like this ⟧ even on a "
                                                                           "terminal (the default without one)")):
    """The first examples rendered through the chat template: the tokens that carry loss highlighted, masked tokens
    dimmed, exactly as the trainer labels them.

    Example: lorafit data preview data/train.jsonl -n 2 --model bundled
    """
    from lorafit.data.inspect import preview_examples
    from lorafit.data.show import print_preview

    print_preview(preview_examples(file, n, model=model, max_length=max_length, format=fmt, overlong=overlong,
                                   loss_on=loss_on, system_prompt=system_prompt), plain=plain or None)


@app.command()
def runs(folder: str = typer.Argument("runs", help="folder searched for run folders (run.json, metrics.jsonl)"),
         as_json: bool = typer.Option(False, "--json", help="print the table as JSON, for scripts")):
    """A table of the runs under a folder: method, model, steps, train and validation loss (final / best), the
    headline metric before -> after training, tokens/s, warnings and date.

    Example: lorafit runs runs/
    """
    from lorafit.runs import find_runs, print_runs, runs_as_json

    found = find_runs(folder)
    if as_json:
        typer.echo(runs_as_json(found))
    else:
        print_runs(found)


@app.command()
def compare(run_a: str = typer.Argument(..., help="a run folder"), run_b: str = typer.Argument(..., help="another"),
            as_json: bool = typer.Option(False, "--json", help="print the differences as JSON, for scripts")):
    """Two runs side by side: the settings that differ (config, data, base model, versions) and every score.

    Example: lorafit compare runs/lr-1e-4 runs/lr-2e-4
    """
    from lorafit.runs import compare_runs, print_compare

    diff = compare_runs(run_a, run_b)
    if as_json:
        import json

        typer.echo(json.dumps(diff, indent=1, default=str))
        return
    print_compare(diff)


@app.command("doctor")
def doctor_command(as_json: bool = typer.Option(False, "--json", help="print the findings as JSON, for scripts")):
    """What this machine has (Python, torch, CUDA, GPUs, bitsandbytes, attention kernels, libraries, the bundled
    model) and, for each lorafit feature, whether it works here and the command that fixes it.

    Example: lorafit doctor
    """
    from lorafit.doctor import doctor

    doctor(as_json=as_json)


COMMANDS = {"train": train, "plan": plan, "generate": generate, "eval": eval_command, "merge": merge,
            "export": export, "quantize": quantize, "demo": demo, "report": report, "sweep": sweep,
            "runs": runs, "compare": compare, "doctor": doctor_command}
DATA_COMMANDS = {"stats": data_stats_command, "preview": data_preview_command}  # `lorafit data ...`


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
