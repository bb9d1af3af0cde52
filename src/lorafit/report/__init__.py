"""Reports on finished (or running) runs: `write_report(run_dir)` writes one self-contained HTML page."""

from lorafit.report.html import write_report

__all__ = ["write_report"]
