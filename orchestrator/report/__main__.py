"""`python -m orchestrator.report results/<sweep> [--format html|md] [--out DIR]`: see orchestrator.report.write."""

from __future__ import annotations

from grnn_engine.cli_values import run_command
from orchestrator.report.write import main

if __name__ == "__main__":
    run_command(main)
