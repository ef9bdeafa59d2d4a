"""`python -m orchestrator.report results/<sweep> [--format html|md] [--out DIR]`: see orchestrator.report.write."""

from __future__ import annotations

import sys

from orchestrator.report.write import main

if __name__ == "__main__":
    sys.exit(main())
