"""Final evaluation: retrain the best configuration on train+validation, test once. No Ray.

    python -m results final runs/vgg-1 [--trial ID | --top K] [--seeds 3]

The only code in the project that reads the test split.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from fmnist.config import RUNTIME_KEYS
from results import leaderboard as lb
from results import plots
from results.store import (
    FINAL_DIR,
    ExperimentStore,
    canonical_epochs,
    open_experiment,
    os_reason,
)


class FinalError(ValueError):
    """The experiment cannot be evaluated (not an experiment, nothing finished, data changed)."""


class FinalWriteError(OSError):
    """The evaluation ran into a file it could not write (a full disk, a bucket gone)."""


def choose(trials: pd.DataFrame, trial_id: str | None, top: int) -> pd.DataFrame:
    """The trials to retrain: `--trial ID`, else the best `top` finished ones."""
    finished = trials[trials["status"].isin(lb.FINISHED) & trials["best_val_accuracy"].notna()]
    if trial_id is not None:
        picked = trials[trials["trial_id"] == trial_id]
        if picked.empty:
            raise FinalError(f"no trial {trial_id!r} in this experiment")
        if picked["best_val_accuracy"].isna().all():
            raise FinalError(f"trial {trial_id!r} never finished an epoch")
        board = lb.ranked(trials.assign(experiment=""))  # its rank on the leaderboard
        return board[board["trial_id"] == trial_id]
    if finished.empty:
        raise FinalError("the experiment has no finished trial to evaluate")
    return lb.ranked(finished.assign(experiment="")).head(top)


def experiment_splits(experiment: dict[str, Any], data_dir: str | None = None):
    """The train/validation split a search used, rebuilt from its experiment row."""
    from fmnist.data import load_splits

    return load_splits(data_dir or experiment["data_location"], experiment["dataset"],
                       val_size=int(experiment["val_size"]),
                       train_size=int(experiment["train_size"]),
                       seed=int(experiment["split_seed"]))


def config_for(trial: pd.Series, precision: str = "recorded"):
    """The trial's TrainConfig, as the search trained it: its `epochs` is the schedule's
    length (the search's max_t), which a trial stopped early did not reach; `trial["epochs"]`
    is how many it ran. precision "recorded": what the search trained it with (the space's
    value, else the trial's recorded `precision`); otherwise that value."""
    from fmnist.train import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in lb.params_of(trial).items() if k in known
              and k not in RUNTIME_KEYS}
    ran = int(trial["epochs"])
    values["epochs"] = max(ran, int(values.get("epochs", ran)))
    recorded = trial.get("precision")  # what the search trained with, where it was recorded
    if precision != "recorded":
        values["precision"] = precision
    elif "precision" not in values and isinstance(recorded, str) and recorded:
        values["precision"] = recorded
    return TrainConfig.from_dict(values)


def epochs_text(cfg, ran: int) -> str:
    """How long the retrain is: `ran` epochs, and for a trial the search stopped before the
    end of its cosine schedule (which depends on the length), which schedule it stops in."""
    text = f"{ran} epoch" + ("s" if ran != 1 else "")
    if ran < cfg.epochs and cfg.lr_schedule == "cosine":
        text += f" (of its {cfg.epochs}-epoch cosine schedule: the search stopped it there)"
    return text


def slow_precision_note(cfg) -> str | None:
    """A line for a retrain in bfloat16 on a CPU without bfloat16 instructions, or None."""
    from fmnist.config import bf16_cpu

    if cfg.precision != "mixed_bfloat16" or bf16_cpu():
        return None
    return ("note: retraining in mixed_bfloat16 on this CPU, which has no bfloat16 "
            "instructions: emulated and slow; --precision float32 retrains in float32")


def run_final(path: str, trial_id: str | None = None, top: int = 1, seeds: int = 3,
              data_dir: str | None = None, out=None, argv: list[str] | None = None,
              precision: str = "recorded", test_dir: str | None = None) -> dict[str, Any]:
    """Retrain, test, and write final/ (final.parquet, model.keras, report.md, PNGs); where
    final/ holds an earlier evaluation, final-2/ (then final-3/, ...). The train files come
    from `data_dir` (else where the search read them), the test pair from `test_dir` (else
    the same folder)."""
    out = out or sys.stdout
    store = open_experiment(path)
    experiment = store.read_experiment()  # StoreError: missing, not an experiment, damaged
    trials, all_epochs = store.read_trials(), store.read_epochs(canonical=False)
    epochs = canonical_epochs(all_epochs)
    chosen = choose(trials, trial_id, top)
    pending = lb.without_trial_row(trials, epochs)
    if len(pending):
        print(f"note: {lb.unranked_note(pending, False)}; final chooses among the others",
              file=out, flush=True)

    from fmnist.data import DataError, load_test

    location = data_dir or experiment["data_location"]
    splits = experiment_splits(experiment, data_dir)
    if splits.source.fingerprint != experiment["dataset_fingerprint"]:
        raise FinalError(f"the data at {location} is not the data the search used "
                         "(fingerprint differs)")
    try:
        x_test, y_test, test_source = load_test(test_dir or location, experiment["dataset"])
    except DataError as exc:  # a search needs no test files; this is where they must be
        if test_dir:
            raise FinalError(f"--test-dir: {exc}") from None
        raise FinalError(f"{exc}; --test-dir names the folder that holds the test pair") from None
    data = {"x_train": np.concatenate([splits.x_train, splits.x_val]),
            "y_train": np.concatenate([splits.y_train, splits.y_val]),
            "x_val": splits.x_val[:0], "y_val": splits.y_val[:0]}

    # TensorFlow only now: the checks above (data included) answer without it.
    from fmnist.evaluate import evaluate
    from fmnist.train import train
    with claimed(store) as claim, final_files(store, claim.folder) as final_dir:
        folder = claim.folder  # two finals at once get two folders
        if claim.passed:
            print(f"{'; '.join(claim.passed)}; this one goes to {folder}/ (none is "
                  "overwritten)", file=out, flush=True)
        names = splits.class_names
        rows, per_class, saved = [], [], None
        for trial in chosen.itertuples(index=False):
            trial = pd.Series(trial._asdict())
            base = config_for(trial, precision)
            note = slow_precision_note(base)
            if note:
                print(note, file=out, flush=True)
            ran = int(trial["epochs"])
            retrain = epochs_text(base, ran)
            for s in range(seeds):
                cfg = base.replace(seed=base.seed + s)
                print(f"trial {trial['trial_id']} (rank {trial['rank']}), seed {s + 1}/{seeds}: "
                      f"{retrain} on {len(data['y_train']):,} train+validation images",
                      file=out, flush=True)

                def progress(m, ran=ran):
                    print(f"  epoch {m['epoch']}/{ran}  loss {m['loss']:.4f}  "
                          f"acc {m['accuracy']:.4f}  {m['epoch_time_s']:.1f}s", file=out,
                          flush=True)
                    return m["epoch"] < ran  # where the search stopped it

                t0 = time.perf_counter()
                run = train(cfg, data, on_epoch_end=progress)
                train_s = time.perf_counter() - t0
                claim.tested = True  # the folder now holds a look at the test set
                ev, probs = evaluate(run.model, x_test, y_test, names)
                print(f"  test accuracy {ev.accuracy:.4f}", file=out, flush=True)
                rows.append({"trial_id": trial["trial_id"], "rank": int(trial["rank"]),
                             "seed": cfg.seed, "epochs": run.epoch,
                             "val_accuracy_in_search": float(trial["best_val_accuracy"]),
                             "test_accuracy": ev.accuracy, "train_time_s": train_s,
                             "train_images": len(data["y_train"]), "test_images": len(y_test),
                             "precision": run.precision,
                             "test_location": test_source.location,
                             "test_fingerprint": test_source.fingerprint,
                             "config": json.dumps(cfg.to_dict(), default=list)})
                if saved is None:  # the first seed of the best configuration is the one kept
                    run.model.save(final_dir / "model.keras")
                    saved = (trial, ev, probs, retrain)
                    per_class = [{"trial_id": trial["trial_id"], "seed": cfg.seed, **r}
                                 for r in ev.per_class()]
        results = pd.DataFrame(rows)
        pa_table = pa.Table.from_pandas(results, preserve_index=False)
        store.write_table(pa_table, f"{folder}/final.parquet")
        store.write_table(pa.Table.from_pylist(per_class), f"{folder}/per_class.parquet")

        trial, ev, probs, retrain = saved
        figures = {
            "confusion_matrix.png": plots.confusion_heatmap(
                ev.confusion, names, final_dir / "confusion_matrix.png",
                title=f"Confusion matrix, test set, trial {trial['trial_id']}"),
            "misclassified.png": plots.misclassified_grid(x_test, y_test, probs, names,
                                                          final_dir / "misclassified.png"),
        }
        drawn = write_figures(experiment, trials, epochs, final_dir, splits)
        flags = drawn["hyperparameters.png"]["flags"]
        summary = summarize(results)
        report = render_report(experiment, trials, epochs, all_epochs, results, summary, ev,
                               trial, flags, argv or [], folder, pending, retrain, test_source)
        (final_dir / "report.md").write_text(report)
    print(f"test accuracy {accuracy_text(summary)}; report: {store.uri(folder, 'report.md')}",
          file=out, flush=True)
    return {"summary": summary, "figures": sorted([*figures, *drawn]),
            "final_dir": store.uri(folder)}


@dataclass
class Claim:
    folder: str
    passed: list[str]  # why each earlier folder was passed over
    tested: bool = False  # whether a model has been tested (the test set looked at)


@contextlib.contextmanager
def claimed(store: ExperimentStore):
    """Claim a final folder (`claim_final_folder`) for the evaluation, and drop the claim when
    it ends: it finished (final.parquet marks the folder), or it failed or was stopped before
    it tested a model (the folder is free again). One that stopped after it tested a model
    keeps its claim, so the next goes beside it, as it would beside a finished one."""
    claim = Claim(*store.claim_final_folder())
    try:
        yield claim
    except BaseException as exc:
        if not claim.tested:
            store.release_final_folder(claim.folder)
        if isinstance(exc, OSError):
            looked = ("; the test set was looked at, so the next evaluation goes beside it"
                      if claim.tested else "")
            raise FinalWriteError(f"cannot write the evaluation to {store.uri(claim.folder)} "
                                  f"({os_reason(exc)}){looked}") from exc
        raise
    store.release_final_folder(claim.folder)


@contextlib.contextmanager
def final_files(store: ExperimentStore, folder: str):
    """The local folder the report, plots and model are written to: the experiment's own
    `folder`, or for a bucket a temporary one whose files are uploaded there at the end
    (also when the evaluation fails part way, so nothing it made is lost)."""
    if store.is_local:
        path = Path(store.path) / folder
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fmnist-final-") as staging:
        try:
            yield Path(staging)
        finally:
            for file in sorted(Path(staging).iterdir()):
                store.put_file(file, f"{folder}/{file.name}")


def summarize(results: pd.DataFrame) -> dict[str, Any]:
    best = results[results["rank"] == results["rank"].min()]
    acc = best["test_accuracy"].to_numpy()
    return {"trial_id": best["trial_id"].iloc[0], "seeds": len(acc),
            "test_accuracy_mean": float(acc.mean()),
            "test_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else None}


def accuracy_text(summary: dict[str, Any], bold: bool = False) -> str:
    """'0.8263 +- 0.0047 (mean +- standard deviation over 3 seeds)', or, with one seed,
    that one seed measures no spread; `bold` closes a Markdown '**' after the numbers."""
    mean = f"{summary['test_accuracy_mean']:.4f}"
    if summary["test_accuracy_std"] is None:
        return (f"{mean}{'**' if bold else ''} (one seed, so no spread measured: "
                "--seeds 3 gives one)")
    return (f"{mean} +- {summary['test_accuracy_std']:.4f}{'**' if bold else ''} "
            f"(mean +- standard deviation over {summary['seeds']} seeds)")


def write_figures(experiment: dict[str, Any], trials: pd.DataFrame, epochs: pd.DataFrame,
                  folder: Path, splits=None) -> dict[str, Any]:
    """The analysis plots of one experiment, into `folder`; returns what each one drew."""
    settings = json.loads(experiment.get("scheduler_settings") or "{}")
    space = json.loads(experiment.get("space") or "{}")
    drawn = {
        "learning_curves.png": plots.learning_curves(epochs, trials,
                                                     folder / "learning_curves.png"),
        "anytime.png": plots.anytime_curves(epochs.assign(experiment=experiment["name"]),
                                            folder / "anytime.png"),
        "hyperparameters.png": plots.hyperparameter_axes(trials, space,
                                                         folder / "hyperparameters.png"),
        "scheduler.png": plots.scheduler_view(trials, int(experiment["max_epochs"]),
                                              folder / "scheduler.png",
                                              rungs=settings.get("rungs")),
    }
    if splits is not None:
        drawn["dataset.png"] = plots.dataset_overview(splits.x_train, splits.y_train,
                                                      splits.class_names,
                                                      folder / "dataset.png")
    return drawn


def render_report(experiment: dict[str, Any], trials: pd.DataFrame, epochs: pd.DataFrame,
                  all_epochs: pd.DataFrame, results: pd.DataFrame, summary: dict[str, Any], ev,
                  trial: pd.Series, flags: dict[str, str], argv: list[str], folder: str,
                  pending: pd.DataFrame, retrain: str, test_source=None) -> str:
    """report.md: leaderboard, plots, final figures, accounting, provenance. `epochs`: the
    canonical view, `all_epochs`: every row (epochs run again included). `pending`: the
    trials without a trial row (lb.without_trial_row); `retrain`: how long the best
    configuration was retrained (epochs_text)."""
    acct = lb.accounting(experiment, trials, epochs, all_epochs)
    board = lb.leaderboard(trials.assign(experiment=experiment["name"]), top=10,
                           searched=lb.searched_params([experiment.get("space")]))
    versions = json.loads(experiment.get("versions") or "{}")
    per_class = pd.DataFrame(ev.per_class()).round(4)
    by_seed = results[["trial_id", "rank", "seed", "epochs", "val_accuracy_in_search",
                       "test_accuracy", "train_time_s"]].round(
        {"val_accuracy_in_search": 4, "test_accuracy": 4, "train_time_s": 1})
    lines = [
        f"# Final evaluation: {experiment['name']}",
        "",
        f"Best configuration: trial `{summary['trial_id']}` (family "
        f"`{trial['family']}`), retrained on train+validation "
        f"({int(results['train_images'].iloc[0]):,} images) for "
        f"{retrain} with {summary['seeds']} "
        "seed(s), then evaluated once on the "
        f"{int(results['test_images'].iloc[0]):,}-image test set.",
        "",
        f"**Test accuracy: {accuracy_text(summary, bold=True)}; best validation accuracy in "
        f"the search: {float(trial['best_val_accuracy']):.4f}.",
        "",
        *([] if pending.empty else [
            f"Not in this evaluation's choice: {lb.unranked_note(pending, False)}. The "
            "leaderboard and compute figures below are of the trials recorded when it ran.",
            ""]),
        *([] if folder == FINAL_DIR else [
            f"This is evaluation {folder.rsplit('-', 1)[-1]} of this experiment on the test set; "
            f"the earlier ones are in `{FINAL_DIR}/` and beside it. Picking one of them by its "
            "test accuracy makes the test set part of the selection, and its accuracy an "
            "optimistic estimate.", ""]),
        "## Leaderboard (validation split)",
        "",
        lb.format_table(board, "md"),
        "## Final runs",
        "",
        lb.format_table(by_seed, "md"),
        f"## Per-class scores (trial {summary['trial_id']}, seed {int(results['seed'].iloc[0])},"
        " the saved `model.keras`)",
        "",
        lb.format_table(per_class, "md"),
        "![confusion matrix](confusion_matrix.png)",
        "",
        "![misclassified test images](misclassified.png)",
        "",
        "## Search",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![anytime curves](anytime.png)",
        "",
        "![hyperparameters](hyperparameters.png)",
        "",
    ]
    if flags:
        lines += ["Ranges to move (the best trials sit at one edge): "
                  + ", ".join(f"`{k}` ({v})" for k, v in sorted(flags.items())), ""]
    lines += [
        "![trials per epoch](scheduler.png)",
        "",
        "![dataset](dataset.png)",
        "",
        "## Compute",
        "",
        f"- trials: {acct['trials']} ({acct['completed']} completed, {acct['stopped_early']} "
        f"stopped early, {acct['failed']} failed)",
        f"- trial-epochs run: {acct['trial_epochs']} of "
        f"{acct['trial_epochs_without_early_stopping']} without early stopping "
        f"({acct['epochs_saved_fraction']:.0%} saved)" + (
            f"; {acct['trial_epochs_rerun']} more ran again after a failure or a resume (the "
            "tables and plots use each epoch's last run)" if acct["trial_epochs_rerun"] else ""),
        f"- core-seconds in epochs: {acct['core_seconds']:,.0f}" + (
            f" ({acct['core_seconds_rerun']:,.0f} in epochs run again)"
            if acct["trial_epochs_rerun"] else "") +
        f"; GPU-seconds: {acct['gpu_seconds']:,.0f}",
        f"- best validation accuracy {acct['best_val_accuracy']} first reached after "
        f"{acct['best_found_after_s']} s and {acct['best_found_after_trial_epochs']} "
        "trial-epochs",
        f"- final retraining: {results['train_time_s'].sum():,.0f} s",
        "",
        "## Provenance",
        "",
        f"- search: `{experiment.get('command', '')}`",
        f"- final: `{_cmd(argv)}`",
        f"- scheduler {experiment['scheduler']}, searcher {experiment['searcher']}, "
        f"{experiment['num_samples']} samples, max {experiment['max_epochs']} epochs",
        f"- dataset {experiment['dataset']} at {experiment['data_location']}, fingerprint "
        f"`{experiment['dataset_fingerprint']}`, split train {experiment['train_size']} / "
        f"val {experiment['val_size']} (seed {experiment['split_seed']})",
        *([provenance_of_test_set(test_source)] if test_source is not None else []),
        f"- git commit `{experiment.get('git_commit', 'unknown')}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        f"- written {datetime.now(UTC).isoformat(timespec='seconds')} on "
        f"{platform.node()} (Python {platform.python_version()})",
        "",
    ]
    return "\n".join(lines)


def provenance_of_test_set(source) -> str:
    """The report's provenance line for the test set: where, its fingerprint, and whether its
    files are the published ones (fmnist.data.Source.published)."""
    line = f"- test set at {source.location}, fingerprint `{source.fingerprint}`"
    if source.published is not None:
        line += (f" ({'' if source.published else '**not** '}the published {source.dataset} "
                 "test files)")
    return line


def _cmd(argv: list[str]) -> str:
    return shlex.join([sys.executable, "-m", "results", *argv])
