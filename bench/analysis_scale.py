"""Time the offline analysis on a synthetic experiment of 10,000 trials x 50 epochs.

    python bench/analysis_scale.py [--trials 10000] [--epochs 50]

All 50 epochs for every trial (500,000 epoch rows), written in the real Parquet layout as
1,000 part files (as a long search's periodic flushes leave them), then
timed: reading the canonical views, the leaderboard and the anytime curve. Prints one JSON line
and appends it to bench/results/analysis_scale.jsonl. Target: a few seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from results import leaderboard as lb  # noqa: E402
from results.synthetic import write_synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--parts", type=int, default=1000,
                        help="epoch part files, as the recorder's periodic flushes leave them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        write_synthetic(root, "scale", args.trials, args.epochs, stopped_fraction=0.0,
                        parts=args.parts)
        write_s = time.perf_counter() - t0
        path = str(Path(root) / "scale")
        t0 = time.perf_counter()
        exps = lb.load([path])
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        board = lb.leaderboard(exps.trials, top=10)
        board_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        curve = lb.anytime(exps.epochs)
        anytime_s = time.perf_counter() - t0
    summary = {
        "bench": "analysis_scale", "trials": args.trials, "parts": args.parts,
        "epoch_rows": len(exps.epochs),
        "write_s": round(write_s, 2), "load_s": round(load_s, 2),
        "leaderboard_s": round(board_s, 3), "anytime_s": round(anytime_s, 3),
        "load_plus_leaderboard_s": round(load_s + board_s, 2),
        "load_plus_anytime_s": round(load_s + anytime_s, 2),
        "best": float(board["best_val_accuracy"].iloc[0]), "curve_points": len(curve),
        "time": time.time(),
    }
    emit("analysis_scale", summary)


if __name__ == "__main__":
    main()
