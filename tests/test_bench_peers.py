"""bench/bench_peers.py on CPU: FLOPs per token, RESULT parsing, the candidate search, the table and --dry-run."""

import copy
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from bench import bench_peers as bp

ROOT = Path(__file__).resolve().parent.parent


def test_flops_per_token_qwen7b_by_hand():
    h, kv, inter, layers, vocab, heads, head_dim = 3584, 512, 18944, 28, 152064, 28, 128
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * vocab
    assert bp.matmul_params("qwen2.5-7b") == params == 7_070_285_824
    attention = 6 * layers * 2048 * heads * head_dim
    assert bp.flops_per_token("qwen2.5-7b", 2048) == 4 * params + attention
    # attention grows linearly with the sequence; the matmul part does not move
    assert bp.flops_per_token("qwen2.5-7b", 4096) - bp.flops_per_token("qwen2.5-7b", 2048) == attention


def test_flops_per_token_counts_tied_lm_head():
    h, inter, layers, vocab = 1536, 8960, 28, 151936
    kv = 2 * (h // 12)
    assert bp.matmul_params("qwen2.5-1.5b") == layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * vocab


LORAFIT_OOM = 'loading...\nRESULT {"stack": "lorafit", "seq": 2048, "bs": 16, "status": "out of memory (CUDA)", ' \
              '"peak_alloc_gb": 15.2, "tok_s": null}\n'
ANCHOR_OK = 'Unsloth: patching\nRESULT {"stack": "unsloth", "seq": 2048, "bs": 8, "tok_s": 10974, ' \
            '"peak_alloc_gb": 10.41, "peak_reserved_gb": 12.0, "step_s": 1.49}\n'
ANCHOR_OOM = 'Traceback (most recent call last):\n  File "anchor_step.py", line 60\n' \
             'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n'
ANCHOR_FAIL = "Traceback (most recent call last):\nModuleNotFoundError: No module named 'unsloth'\n"


def test_parse_and_classify():
    assert bp.parse_result("no result here") is None
    assert bp.parse_result(ANCHOR_OK)["tok_s"] == 10974
    assert bp.classify(0, ANCHOR_OK)["status"] == "ok"
    assert bp.classify(0, LORAFIT_OOM)["status"].startswith("out of memory")
    assert bp.classify(1, ANCHOR_OOM) == {"status": "out of memory"}
    assert bp.classify(1, ANCHOR_FAIL) == {"status": "failed: ModuleNotFoundError: No module named 'unsloth'"}
    assert bp.classify(None, "step 1\n", timed_out=True) == {"status": "timeout"}
    assert bp.classify(-9, "")["status"] == "failed: exit -9"


def fake(speed: dict, oom_from: int, key: str = "bs", seq: int = 2048):
    calls = []

    def run(value):
        calls.append(value)
        if value >= oom_from:
            return {"status": "out of memory", key: value, "tok_s": None}
        return {"status": "ok", "seq": value if key == "seq" else seq, "bs": 1 if key == "seq" else value,
                "tok_s": speed[value]}
    return run, calls


def test_search_stops_at_first_oom_and_picks_fastest():
    run, calls = fake({8: 10_000, 12: 11_500, 16: 11_000}, oom_from=20)
    records = bp.search([16, 8, 20, 24, 12], run)
    assert calls == [8, 12, 16, 20]  # increasing order, nothing past the first out of memory
    assert bp.pick(records, "bs")["bs"] == 12


def test_search_longest_sequence_and_nothing_fits():
    run, calls = fake({16384: 8800, 32768: 6900}, oom_from=49152, key="seq")
    records = bp.search([49152, 32768, 16384, 65536], run)
    assert calls == [16384, 32768, 49152]
    assert bp.pick(records, "seq")["seq"] == 32768  # longest that trains, though slower
    run, calls = fake({}, oom_from=0)
    assert bp.pick(bp.search([2, 4], run), "bs") is None and calls == [2]
    assert bp.search([], run) == [] and bp.pick([], "bs") is None


def test_failures_do_not_stop_the_search_but_timeouts_do():
    seen = []
    bp.search([1, 2], lambda v: seen.append(v) or {"status": "failed: x"})
    bp.search([3, 4], lambda v: seen.append(v) or {"status": "timeout"})
    assert seen == [1, 2, 3]


def test_dry_run_lists_the_commands():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "bench/bench_peers.py", "--dry-run", "--stacks", "lorafit,unsloth",
                          "--install-peers"], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("INSTALL python -m pip install") and "--target /tmp/peers_site" in lines[0]
    runs = [line for line in lines if line.startswith("[")]
    anchor = shlex.quote(bp.anchor_shown())  # inside the repo in a dev checkout, beside it (../shared) in CI
    assert runs == [
        "[fixed lorafit] python bench/bench_train.py qwen2.5-7b 2048 2 --steps 7",
        f"[fixed unsloth] CAP_GB=0 STEPS=7 PYTHONPATH=/tmp/peers_site:$PYTHONPATH python {anchor} unsloth qwen2.5-7b 2048 2",  # noqa: E501
        *(f"[7b16 lorafit] python bench/bench_train.py qwen2.5-7b 2048 {b} --cap-gb 16 --steps 7"
          for b in (8, 12, 16)),
        *(f"[7b16 unsloth] CAP_GB=16 STEPS=7 PYTHONPATH=/tmp/peers_site:$PYTHONPATH python "
          f"{anchor} unsloth qwen2.5-7b 2048 {b}" for b in (8, 12)),
        *(f"[15b12 lorafit] python bench/bench_train.py qwen2.5-1.5b 1024 {b} --cap-gb 12 --steps 7"
          for b in (16, 32, 48)),
        *(f"[15b12 unsloth] CAP_GB=12 STEPS=7 PYTHONPATH=/tmp/peers_site:$PYTHONPATH python "
          f"{anchor} unsloth qwen2.5-1.5b 1024 {b}" for b in (16, 32)),
        *(f"[long lorafit] PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python bench/bench_train.py qwen2.5-7b "
          f"{s} 1 --cap-gb 16 --steps 4 --offload --mlp-chunk 8192" for s in (65536, 98304)),
        *(f"[long unsloth] CAP_GB=16 STEPS=4 PYTHONPATH=/tmp/peers_site:$PYTHONPATH python "
          f"{anchor} unsloth qwen2.5-7b {s} 1" for s in (32768, 49152)),
    ]


def test_dry_run_overrides():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "bench/bench_peers.py", "--dry-run", "--stacks", "lorafit,hf",
                          "--only", "7b16", "--no-install-peers", "--cands", "7b16.lorafit=20,4", "--cands",
                          "7b16.hf=", "--lorafit-flags=7b16=--mlp-chunk 4096", "--lorafit-flags=all=--cuda-graphs"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    runs = [line for line in out.splitlines() if line.startswith("[")]
    assert runs == [f"[7b16 lorafit] python bench/bench_train.py qwen2.5-7b 2048 {b} --cap-gb 16 --steps 7 "
                    "--mlp-chunk 4096 --cuda-graphs" for b in (4, 20)]


@pytest.fixture
def configs(monkeypatch):
    monkeypatch.setattr(bp, "CONFIGS", copy.deepcopy(bp.CONFIGS))


def test_main_with_fake_runs_writes_json_and_table(configs, monkeypatch, tmp_path, capsys):
    def execute(argv, env, timeout):
        if argv[-1] == "--measure-rate":
            return 0, 'RATE {"flops": 8e14, "device": "Fake H100"}\n', False
        if "bench_train.py" in argv[0]:
            bs = int(argv[3])
            if bs >= 16:
                return 0, LORAFIT_OOM, False
            return 0, "RESULT " + json.dumps(dict(stack="lorafit", seq=2048, bs=bs, status="ok", tok_s=1000 * bs,
                                                  peak_alloc_gb=5.0, peak_reserved_gb=6.0)), False
        bs = int(argv[4])
        if bs >= 12:
            return 1, ANCHOR_OOM, False
        return 0, "RESULT " + json.dumps(dict(stack="unsloth", seq=2048, bs=bs, tok_s=800 * bs, peak_alloc_gb=7.0,
                                              peak_reserved_gb=8.0)), False

    monkeypatch.setattr(bp, "execute", execute)
    monkeypatch.setattr(sys, "argv", ["bench_peers.py", "--only", "fixed,7b16", "--no-install-peers",
                                      "--out", str(tmp_path)])
    bp.main()
    data = json.loads((tmp_path / "peers.json").read_text())
    assert data["matmul_flops"] == 8e14 and data["device"] == "Fake H100"
    assert [(r["config"], r["stack"], r["bs"], r["status"][:13]) for r in data["runs"]] == [
        ("fixed", "lorafit", 2, "ok"), ("fixed", "unsloth", 2, "ok"), ("7b16", "lorafit", 8, "ok"),
        ("7b16", "lorafit", 12, "ok"), ("7b16", "lorafit", 16, "out of memory"), ("7b16", "unsloth", 8, "ok"),
        ("7b16", "unsloth", 12, "out of memory")]
    assert "python bench/bench_train.py" in data["runs"][0]["cmd"] and "log_tail" in data["runs"][-1]
    md = (tmp_path / "peers.md").read_text()
    assert "8.0 TFLOP/s" not in md and "800.0 TFLOP/s on Fake H100" in md
    row = next(line for line in md.splitlines() if line.startswith("| 7B 2048, 16 GB") and "lorafit" in line)
    mfu = 100 * 12000 * bp.flops_per_token("qwen2.5-7b", 2048) / 8e14
    assert "2,048 × 12 | 12,000 | 5.0 / 6.0 |" in row and f"{mfu:.1f}%" in row and "1.88×" in row
    fixed = next(line for line in md.splitlines() if line.startswith("| 7B 2048 × 2") and "lorafit" in line)
    assert "1.25×, alloc 5.0 vs 7.0 GB" in fixed
    assert md.strip() in capsys.readouterr().out
