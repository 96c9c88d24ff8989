"""Train the reference CNN on the real 48k/12k split for 5 epochs; print accuracy and images/s.

    python bench/train_reference.py [--epochs 5] [--train-size N] [--jit-compile]

Prints one line per epoch and a one-line JSON summary, appended to bench/results/reference.jsonl.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402
from searchbench import REFERENCE  # noqa: E402

from fmnist.data import load_splits  # noqa: E402
from fmnist.train import TrainConfig, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data-dir")
    parser.add_argument("--train-size", type=int, help="class-balanced subset (default: all 48k)")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile the train step with XLA (off by default: slower on CPU)")
    args = parser.parse_args()
    data = load_splits(args.data_dir, train_size=args.train_size)
    cfg = TrainConfig(epochs=args.epochs, jit_compile=args.jit_compile, **REFERENCE)
    epochs = []
    start = time.perf_counter()
    run = train(cfg, data, on_epoch_end=lambda m: (epochs.append(m), print(
        f"epoch {m['epoch']}  val_accuracy {m['val_accuracy']:.4f}  "
        f"{m['train_samples_per_s']:.0f} img/s  {m['epoch_time_s']:.1f} s", flush=True)))
    wall = time.perf_counter() - start
    summary = {
        "bench": "train_reference", "config": REFERENCE, "epochs": args.epochs,
        "jit_compile": args.jit_compile,
        "train": len(data.y_train), "val": len(data.y_val),
        "params": run.model.count_params(),
        "final_val_accuracy": round(epochs[-1]["val_accuracy"], 4),
        "best_val_accuracy": round(max(m["val_accuracy"] for m in epochs), 4),
        "train_images_per_s": round(sum(m["train_samples_per_s"] for m in epochs) / len(epochs)),
        "wall_s": round(wall, 1), "machine": platform.machine(), "time": time.time(),
    }
    emit("reference", summary)


if __name__ == "__main__":
    main()
