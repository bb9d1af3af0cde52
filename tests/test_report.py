"""`lorafit report`: a real tiny run (base model evaluated, trained, adapter evaluated) turned into one HTML page,
checked by what it says and, where a browser is installed, by a screenshot in headless Chromium."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.report import write_report
from lorafit.report.html import answer_text
from lorafit.train.loop import train
from lorafit.train.progress import Progress
from tests.test_train import tiny_config, write_chat_data
from tests.tiny import make_tiny_checkpoint

pytest.importorskip("matplotlib", reason="lorafit report needs matplotlib (pip install 'lorafit[report]')")

PLOTS = ("loss", "metrics", "lr", "throughput", "memory")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WARNING = {"step": 6, "warning": "grad_spike", "message": "step 6: gradient norm 9.1 is 7.0x the median",
           "spike_norm": 9.1, "median_norm": 1.3}  # a row as train/watch.py logs it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    folder, _ = make_tiny_checkpoint(tmp, "qwen2")
    data = write_chat_data(tmp / "train.jsonl", 40)
    val = write_chat_data(tmp / "val.jsonl", 6, seed=1)
    cfg = tiny_config(tmp, folder, data, max_steps=12, val_every=4,
                      data={"train": str(data), "val": str(val), "max_length": 64},
                      eval={"before_training": True, "metrics": ["exact_match"], "max_new_tokens": 8, "every": 4})
    result = train(cfg, Progress(quiet=True))
    with open(result.output_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(WARNING) + "\n")
    return result.output_dir


class Tables(HTMLParser):
    """The cell texts of every <table id=...>, row by row."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self.current, self.cell = {}, None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id"):
            self.current = self.tables.setdefault(dict(attrs)["id"], [])
        elif tag == "tr" and self.current is not None:
            self.current.append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.current[-1].append(self.cell)
            self.cell = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_shows_curves_scores_answers_warnings_and_config(run_dir):
    path = write_report(run_dir)
    html = path.read_text()
    assert path == run_dir / "report.html"
    # every plot: a valid PNG beside the page, and the same bytes embedded in it
    for name in PLOTS:
        png = (run_dir / f"report_{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000, name
        embedded = re.search(rf"id='plot-{name}'><img alt='[^']*' src='data:image/png;base64,([^']+)'", html)
        assert embedded and base64.b64decode(embedded.group(1)) == png, name
    # nothing fetched from elsewhere: the page is one file
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html

    # base / best / final as train's summary has them, with the run's own numbers
    run = json.loads((run_dir / "run.json").read_text())
    before, best, after = (run["metrics"][k] for k in ("before", "best", "after"))
    assert best["step"] in (4, 8)
    tables = Tables(html).tables
    header, *rows = tables["metrics"]
    assert header == ["metric", "base model", f"best (step {best['step']})", "final", "change"]
    shown = {row[0]: row[1:4] for row in rows}
    for key in ("val_loss", "val_perplexity", "exact_match"):
        assert shown[key] == [f"{before[key]:.4g}", f"{best[key]:.4g}", f"{after[key]:.4g}"], key

    # base model and fine-tuned answers side by side, per held-out input
    base_answers = read_jsonl(run_dir / "eval" / "before_predictions.jsonl")
    tuned_answers = read_jsonl(run_dir / "eval" / "after_predictions.jsonl")
    header, *rows = tables["answers"]
    assert header == ["input", "reference", "base model", "fine-tuned"] and len(rows) == 6
    for row, base, tuned in zip(rows, base_answers, tuned_answers):
        assert row == [answer_text(base["input"]), answer_text(base["reference"]), answer_text(base["prediction"]),
                       answer_text(tuned["prediction"])]

    assert "grad_spike" in html and WARNING["message"] in html
    config = re.search(r"<pre id='config'>(.*?)</pre>", html, re.S).group(1)
    assert "learning_rate: 0.01" in config and "max_steps: 12" in config and "r: 4" in config
    assert f"path: {run['config']['model']['path']}" in config


def test_report_cli_out_file_and_unfinished_run(run_dir, tmp_path):
    main(["report", str(run_dir), "--out", str(tmp_path / "pages" / "x.html"), "--samples", "2"])
    html = (tmp_path / "pages" / "x.html").read_text()
    assert (tmp_path / "pages" / "x_loss.png").is_file() and "(2 of 6)" in html
    # a run still going (or killed) has metrics.jsonl but no run.json yet: its curves are still drawn
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", partial / "metrics.jsonl")
    html = write_report(partial).read_text()
    assert "run.json is not written yet" in html and "id='plot-loss'" in html
    with pytest.raises(LorafitError, match="not a lorafit run folder"):
        write_report(tmp_path / "empty")


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium to render the page: apt-get install chromium")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from matplotlib.image import imread

    page = write_report(run_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
               f"file://{page}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert shot.is_file() and shot.stat().st_size > 50_000, done.stderr[-2000:]
    pixels = imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    gray = pixels.mean(axis=2)
    assert gray.std() > 0.03  # measured 0.09-0.11 on rendered reports; a blank page is 0
    # the plots' colours are there: some clearly blue pixels (the training-loss line)
    blue = (pixels[..., 2] > 0.7) & (pixels[..., 0] < 0.4)
    assert blue.sum() > 500
