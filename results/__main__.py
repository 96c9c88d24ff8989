"""`python -m results {leaderboard,plots,final} RUN [RUN ...]`: analysis from Parquet alone.

Bad input (not an experiment, no finished trial, unknown option) is one line and exit code 2;
a file that cannot be written or read (a full disk, a bucket gone) is one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fmnist.cli import sigterm_as_ctrl_c
from fmnist.config import PRECISIONS, keras_backend_problem
from fmnist.data import DataError, folder_problem
from results import leaderboard as lb
from results.store import StoreError, os_reason


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m results", description="Leaderboards, plots and the final test "
                "evaluation from stored experiments (no Ray needed).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    board = sub.add_parser("leaderboard", help="top-k trials, or a comparison of experiments")
    board.add_argument("runs", nargs="+", help="experiment folders or URIs, or a folder of "
                       "experiments (runs/)")
    board.add_argument("--top", type=int, default=10, help="rows to show (10)")
    board.add_argument("--by", choices=sorted(lb.BY), help="compare experiments by this")
    board.add_argument("--format", choices=("text", "md", "csv"), default="text")
    board.add_argument("--out", help="also write the table to this file")
    plot = sub.add_parser("plots", help="learning, anytime, hyperparameter, scheduler plots")
    plot.add_argument("runs", nargs="+", help="experiment folders or URIs, or a folder of "
                      "experiments (runs/)")
    plot.add_argument("--out", required=True, help="folder for the PNG files")
    plot.add_argument("--top", type=int, default=5, help="trials in the learning curves (5)")
    final = sub.add_parser("final", help="retrain the best config on train+validation and "
                           "evaluate once on the test set")
    final.add_argument("run", help="experiment folder or URI")
    group = final.add_mutually_exclusive_group()
    group.add_argument("--trial", help="evaluate this trial instead of the best one")
    group.add_argument("--top", type=int, default=1, help="evaluate the best K configurations")
    final.add_argument("--seeds", type=int, default=3, help="retraining seeds (3)")
    final.add_argument("--data-dir", help="where the data is now, if it moved since the search")
    final.add_argument("--test-dir", help="folder with the test pair, if not the data folder")
    final.add_argument("--precision", default="recorded", choices=("recorded", *PRECISIONS),
                       help="retrain with what the search recorded (default), or with this")
    return p


def main(argv: list[str] | None = None, out=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        for flag in ("top", "seeds"):
            if getattr(args, flag, 1) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        out_path = getattr(args, "out", None)
        if out_path:  # checked before any experiment is read
            where = Path(out_path) if args.command == "plots" else Path(out_path).parent
            problem = (folder_problem(where) or
                       (f"{out_path} is a folder" if args.command == "leaderboard"
                        and Path(out_path).is_dir() else None))
            if problem:
                raise UsageError(f"--out {out_path}: {problem}")
        if args.command == "final":
            problem = keras_backend_problem()  # final trains: Keras must be able to
            if problem:
                raise UsageError(problem)
            from results.final import FinalError, run_final

            try:
                with sigterm_as_ctrl_c():  # it retrains: minutes, hours with --full's sizes
                    run_final(args.run, args.trial, args.top, args.seeds, args.data_dir,
                              out=out, argv=argv, precision=args.precision,
                              test_dir=args.test_dir)
            except FinalError as exc:
                raise UsageError(str(exc)) from None
            return 0
        exps = lb.load(args.runs)
        for bad in exps.corrupt:
            print(f"warning: unreadable part file moved aside: {bad}", file=sys.stderr)
        if args.command == "leaderboard":
            searched = lb.searched_params(exps.experiments.get("space", []))
            table = (lb.compare(exps, args.by) if args.by
                     else lb.leaderboard(exps.trials, args.top, searched))
            text = lb.format_table(table, args.format)
            print(text, end="", file=out)
            unranked_note(exps)  # on stderr: the table (csv too) stays as it was
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text)
            return 0
        if exps.epochs.empty:
            raise UsageError(f"no epochs recorded yet in {', '.join(args.runs)}: nothing to "
                             "plot (a search records each epoch when it ends)")
        from results import plots

        unranked_note(exps)  # the learning curves are of ranked trials
        folder = Path(args.out)
        plots.learning_curves(exps.epochs, exps.trials, folder / "learning_curves.png",
                              top=args.top)
        plots.anytime_curves(exps.epochs, folder / "anytime.png")
        for row in exps.experiments.to_dict("records"):
            mine = exps.trials[exps.trials["experiment"] == row["experiment"]]
            suffix = f"_{row['experiment']}" if len(exps.experiments) > 1 else ""
            drawn = plots.hyperparameter_axes(mine, json.loads(row["space"]),
                                              folder / f"hyperparameters{suffix}.png")
            for key, edge in drawn["flags"].items():
                print(f"{row['experiment']}: best trials sit at the {edge} edge of {key}",
                      file=out)
            settings = json.loads(row.get("scheduler_settings") or "{}")
            plots.scheduler_view(mine, int(row["max_epochs"]), folder / f"scheduler{suffix}.png",
                                 rungs=settings.get("rungs"))
        first = exps.experiments.iloc[0]
        try:  # the EDA overview needs the images; the search's training split, never the test
            from results.final import experiment_splits

            splits = experiment_splits(first.to_dict())
            plots.dataset_overview(splits.x_train, splits.y_train, splits.class_names,
                                   folder / "dataset.png")
        except (DataError, ValueError, OSError) as exc:
            print(f"dataset overview skipped: {exc}", file=sys.stderr)
        print(f"plots written to {folder}", file=out)
        return 0
    except (UsageError, StoreError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a bucket that stopped answering: not the input's fault
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {os_reason(exc)}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl+C or a final's SIGTERM: what it wrote stays (final.claimed)
        print("interrupted", file=sys.stderr)
        return 130


def unranked_note(exps: lb.Experiments) -> None:
    """On stderr: the trials with epochs but no trial row, which no table or ranking has."""
    pending = lb.without_trial_row(exps.trials, exps.epochs)
    if len(pending):
        print(lb.unranked_note(pending, len(exps.experiments) > 1), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
