"""Shared by the benchmark scripts: print a one-line JSON summary and append it to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def emit(name: str, summary: dict[str, Any]) -> None:
    """Print `summary` as one JSON line and append it to bench/results/<name>.jsonl."""
    line = json.dumps(summary)
    print(line)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{name}.jsonl").open("a") as f:
        f.write(line + "\n")
