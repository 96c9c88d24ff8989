"""GPU throughput: fmnist training under KERAS_BACKEND=jax, one process and several on one GPU.

    python bench/gpu_throughput.py [--procs 1 2 4] [--batch-size 512] [--epochs 3]
                                   [--train-size 48000] [--data-dir DIR]

The config is the `vgg` reference: notebook 000's CustomVGG as `search/spaces/seed-vgg.yaml`
fixes it (4 blocks of 2, 2, 3, 3 convs, 32 to 256 filters, batch norm, dense 256, dropout 0.3,
SGD with momentum 0.9 and cosine decay), learning rate and weight decay at the geometric middle
of that space's ranges, at batch 512. For each count N in `--procs`, N processes start at once
on the same GPU, each training its own copy on the same data: one warm-up epoch (JAX compiles
the steps there), then `--epochs` timed ones. Per process: training images/s inside `fit` (the
same figure a search's epoch rows carry). Aggregate: the training images of all N processes'
timed epochs over the span from the first timed epoch's start to the last one's end (so each
epoch's validation is inside the span, and a process that waited on another counts against
it); the ratio to N = 1 is measured in the same run. Each process holds 0.9 / N of the GPU's
memory (XLA_PYTHON_CLIENT_MEM_FRACTION), as a search does with `--gpus-per-trial 1/N`.

Prints one line per process and a one-line JSON summary, appended to
bench/results/gpu_throughput.jsonl. Needs JAX with a GPU (it refuses to measure a CPU unless
`--allow-cpu`, which is for checking the script itself), keras, numpy and pyyaml (for the
space file); no TensorFlow or Ray.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def reference() -> dict:
    """seed-vgg.yaml's fixed values, and its searched ones at the geometric middle of their range.

    Read from the space file itself, so the benchmark follows it; batch size and epochs are
    this script's.
    """
    from search.spaces import load_space

    space = load_space("seed-vgg")
    config = {k: v for k, v in space.fixed.items() if k not in ("epochs", "batch_size")}
    for key, dist in space.dists.items():  # learning_rate and weight_decay: loguniform
        low, high = dist.args
        config[key] = math.sqrt(low * high)
    return config


def worker(args: argparse.Namespace) -> None:
    """One process: warm up, time `--epochs` epochs, print a JSON line (last line of stdout)."""
    import jax
    import keras

    from fmnist.data import load_splits
    from fmnist.train import TrainConfig, TrainingRun

    device = jax.devices()[0]
    data = load_splits(args.data_dir, train_size=args.train_size, val_size=args.val_size)
    cfg = TrainConfig(**reference(), batch_size=args.batch_size, epochs=args.epochs + 1,
                      precision=args.precision)
    run = TrainingRun(cfg, data)
    warm = run.fit_epoch()
    start, epochs = time.time(), []
    for _ in range(args.epochs):
        epochs.append(run.fit_epoch())
    end = time.time()
    print(json.dumps({
        "pid": os.getpid(), "backend": keras.backend.backend(), "device": str(device),
        "platform": device.platform, "params": run.model.count_params(),
        "precision": run.precision,
        "warmup_epoch_s": round(warm["epoch_time_s"], 2), "start": start, "end": end,
        "train_images": sum(len(data.y_train) for _ in epochs),
        "train_time_s": sum(m["train_time_s"] for m in epochs),
        "epoch_time_s": [round(m["epoch_time_s"], 3) for m in epochs],
        "images_per_s": [round(m["train_samples_per_s"]) for m in epochs],
        "val_accuracy": round(epochs[-1]["val_accuracy"], 4),
    }), flush=True)


def run_group(n: int, args: argparse.Namespace) -> dict:
    """Start n workers at once; wait for all; aggregate what they measured."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / n:.3f}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, __file__, "--worker", "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--train-size", str(args.train_size),
            "--val-size", str(args.val_size), "--precision", args.precision]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-5:])
            sys.exit(f"error: a worker of {n} exited with {proc.returncode}:\n{tail}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        print(f"{n} at once, pid {r['pid']} on {r['device']}: "
              f"{' / '.join(map(str, r['images_per_s']))} images/s, epochs "
              f"{' / '.join(map(str, r['epoch_time_s']))} s (warm-up {r['warmup_epoch_s']} s)",
              flush=True)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    images = sum(r["train_images"] for r in results)
    return {"procs": n, "aggregate_images_per_s": round(images / span),
            "per_process_images_per_s": [round(r["train_images"] / r["train_time_s"])
                                         for r in results],
            "span_s": round(span, 2), "device": results[0]["device"],
            "platform": results[0]["platform"], "params": results[0]["params"],
            "precision": results[0]["precision"]}


def jax_platform() -> tuple[str, str]:
    """The platform and name of JAX's first device, asked in a child process (a JAX backend
    started in this one would hold GPU memory while the workers run), before any training."""
    code = "import jax; d = jax.devices()[0]; print(d.platform, d, sep='|')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: cannot start JAX ({tail}); install jax (with its CUDA plugin on a GPU)")
    platform_name, device = out.stdout.strip().splitlines()[-1].split("|", 1)
    return platform_name, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up")
    parser.add_argument("--train-size", type=int, default=48_000)
    parser.add_argument("--val-size", type=int, default=12_000)
    parser.add_argument("--data-dir", help="folder with the train IDX files")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"), default="float32",
                        help="the models' dtype policy (default float32, what auto gives on JAX)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run where JAX has no GPU (checks the script; measures nothing)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.procs) < 1 or args.epochs < 1 or args.batch_size < 1:
        sys.exit("error: --procs, --epochs and --batch-size must be >= 1")
    if args.worker:
        worker(args)
        return
    platform_name, device = jax_platform()
    if platform_name not in GPU_PLATFORMS and not args.allow_cpu:
        sys.exit(f"error: JAX runs on {device}, not a GPU; --allow-cpu to check the script "
                 "anyway")
    groups = [run_group(n, args) for n in args.procs]
    alone = next((g["aggregate_images_per_s"] for g in groups if g["procs"] == 1), None)
    from report import emit

    emit("gpu_throughput", {
        "bench": "gpu_throughput", "config": reference(), "batch_size": args.batch_size,
        "train": args.train_size, "val": args.val_size, "timed_epochs": args.epochs,
        "device": groups[0]["device"], "params": groups[0]["params"],
        "precision": groups[0]["precision"],
        "images_per_s_alone": alone,
        "aggregate_images_per_s": {g["procs"]: g["aggregate_images_per_s"] for g in groups},
        "aggregate_over_alone": ({g["procs"]: round(g["aggregate_images_per_s"] / alone, 3)
                                  for g in groups} if alone else None),
        "per_process_images_per_s": {g["procs"]: g["per_process_images_per_s"] for g in groups},
        "machine": platform.machine(), "time": time.time(),
    })


if __name__ == "__main__":
    main()
