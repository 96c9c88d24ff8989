"""`python -m fmnist.train`'s flags and checks, without Keras, and the `fmnist-train` command.

Everything a user can get wrong here (a flag's value, the Keras backend, the data, the `--save`
and `--resume` folders) is checked by `prepare` before `fmnist.train` imports Keras, whose
TensorFlow prints its start-up lines on import: a mistake is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fmnist.config import (
    RUNTIME_KEYS,
    ConfigError,
    TrainConfig,
    keras_backend_problem,
    load_yaml,
    unread_problem,
)
from fmnist.data import DataError, Splits, folder_problem, load_splits


def _parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (numbers, booleans, lists)."""
    return load_yaml(text)


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, defaults from the dataclass."""
    group = parser.add_argument_group("training config (TrainConfig fields)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, dest=f.name, type=_parse_value, default=None,
                           help=f"default: {f.default}")


# What a resumed run may change: how long it trains, and how it uses the machine.
RESUME_MAY_CHANGE = ("epochs", "eval_batch_size", *RUNTIME_KEYS)


def resumed_config(folder: str, flags: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with, changed only in RESUME_MAY_CHANGE by `flags`.

    The checkpoint's model and optimizer (its schedule, its compiled step) are what training
    continues with, so another flag that differs would be ignored in part (the model) and
    applied in part (the batch size, augmentation): refused instead, as `search/run.py
    --resume` refuses changes.
    """
    path = Path(folder) / "state.json"
    if not path.is_file():
        raise DataError(f"--resume {folder}: not a checkpoint folder (no state.json; "
                        "--save writes one)")
    try:
        state = json.loads(path.read_text())
        done, saved = int(state["epoch"]), TrainConfig.from_dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--resume {folder}: state.json is not a checkpoint's ({exc})") from None
    asked = TrainConfig.from_dict({**saved.to_dict(), **flags})
    changed = [f"--{f.name.replace('_', '-')} {getattr(asked, f.name)} (the checkpoint's: "
               f"{getattr(saved, f.name)})" for f in fields(TrainConfig)
               if f.name not in RESUME_MAY_CHANGE
               and getattr(asked, f.name) != getattr(saved, f.name)]
    if changed:
        may = ", ".join("--" + name.replace("_", "-") for name in RESUME_MAY_CHANGE)
        raise ConfigError(f"--resume {folder}: {'; '.join(changed)}: a resumed run may change "
                          f"only {may} (the other flags can be left out)")
    if saved.lr_schedule == "cosine":  # its schedule reaches 0 at the config's last epoch
        if done >= saved.epochs:
            raise ConfigError(f"--resume {folder}: the checkpoint ran all {done} epochs of its "
                              "cosine schedule, whose learning rate is 0 from there")
        if asked.epochs > saved.epochs:
            raise ConfigError(f"--resume {folder}: --epochs {asked.epochs} goes past the "
                              f"{saved.epochs} epochs its cosine schedule decays over (the "
                              f"learning rate is 0 after them): --epochs {saved.epochs} at most")
    if asked.epochs <= done:
        raise ConfigError(f"--resume {folder}: the checkpoint has run {done} epochs; --epochs "
                          f"{asked.epochs} leaves none to train (--epochs {done + 1} or more)")
    return asked


@dataclass(frozen=True)
class Prepared:
    """A checked command line: the config, its data, and where to save or resume from."""

    cfg: TrainConfig
    data: Splits
    save: str | None
    resume: str | None


def parser(prog: str = "python -m fmnist.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train one config on Fashion-MNIST.")
    p.add_argument("--data-dir", help="folder with the train IDX files")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist or mnist")
    p.add_argument("--train-size", type=int, help="class-balanced subset of the train split")
    p.add_argument("--val-size", type=int, default=12_000, help="validation images")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split")
    p.add_argument("--save", help="folder to write a checkpoint to after every epoch")
    p.add_argument("--resume", help="checkpoint folder to continue from")
    config_arguments(p)
    return p


def prepare(argv: list[str], prog: str = "python -m fmnist.train") -> Prepared | int:
    """Parse and check `argv` and read the data; an exit code (2) after one `error:` line."""
    args = parser(prog).parse_args(argv)  # argparse's own mistakes: usage and exit code 2
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
              if getattr(args, f.name) is not None}
    try:
        if problem := keras_backend_problem():
            raise ConfigError(problem)
        if args.save and (problem := folder_problem(args.save)):  # before the training it'd lose
            raise DataError(f"--save {args.save}: {problem}")
        cfg = resumed_config(args.resume, values) if args.resume else TrainConfig.from_dict(values)
        if not args.resume:
            settled = {f.name: (getattr(cfg, f.name),) for f in fields(cfg)}
            for key in values:
                if problem := unread_problem(key, settled):
                    raise ConfigError(f"--{key.replace('_', '-')}: {problem}; leave it out")
        data = load_splits(args.data_dir, args.dataset, val_size=args.val_size,
                           train_size=args.train_size, seed=args.split_seed)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return Prepared(cfg, data, args.save, args.resume)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """In the block, SIGTERM stops the command as Ctrl+C does (KeyboardInterrupt).

    SIGTERM is what `kill`, `docker stop`, Kubernetes, Slurm (scancel, a time limit) and systemd
    send; by default it ends the process at once, without the `--resume` line Ctrl+C prints
    or the clean-up it runs. A second SIGTERM ends the process at once. Only from the main
    thread (where Python runs signal handlers), and not where SIGTERM is ignored.
    """
    before = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or before is signal.SIG_IGN:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def main(argv: list[str] | None = None) -> int:
    """The `fmnist-train` command: `python -m fmnist.train`, checked before Keras is imported."""
    prepared = prepare(sys.argv[1:] if argv is None else argv, prog="fmnist-train")
    if isinstance(prepared, int):
        return prepared
    from fmnist.train import run_prepared  # Keras (and TensorFlow's start-up lines) from here

    return run_prepared(prepared)
