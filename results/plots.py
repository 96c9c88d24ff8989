"""Plots from stored Parquet (matplotlib, PNG). Each function returns the data it drew. No Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from results.leaderboard import anytime, ranked  # noqa: E402
from results.store import PARAM_PREFIX  # noqa: E402

LOG_KINDS = ("loguniform", "qloguniform")
RANGE_KINDS = ("uniform", "loguniform", "randint", "quniform", "qloguniform")
EDGE = 0.15  # a value in the outer 15% of its range counts as "at the edge"
DPI = 110


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def learning_curves(epochs: pd.DataFrame, trials: pd.DataFrame, path: Path,
                    top: int = 5) -> dict[str, pd.DataFrame]:
    """Validation accuracy and loss per epoch of the top-k trials, keyed by trial (by
    experiment/trial when the trials come from several experiments)."""
    if "experiment" not in trials:
        trials = trials.assign(experiment="")
        epochs = epochs.assign(experiment="")
    best = ranked(trials).head(top)
    several = trials["experiment"].nunique() > 1  # then a trial is named experiment/trial
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = {}
    for row in best.itertuples():
        mine = epochs[(epochs["trial_id"] == row.trial_id)
                      & (epochs["experiment"] == row.experiment)].sort_values("epoch")
        name = f"{row.experiment}/{row.trial_id}" if several else row.trial_id
        label = f"#{row.rank} {name} ({row.best_val_accuracy:.3f})"
        ax_acc.plot(mine["epoch"], mine["val_accuracy"], marker="o", ms=3, label=label)
        ax_loss.plot(mine["epoch"], mine["val_loss"], marker="o", ms=3, label=label)
        drawn[name] = mine[["epoch", "val_accuracy", "val_loss"]]
    ax_acc.set(title=f"Validation accuracy, top {len(best)} trials", xlabel="epoch",
               ylabel="validation accuracy")
    ax_loss.set(title=f"Validation loss, top {len(best)} trials", xlabel="epoch",
                ylabel="validation loss (cross-entropy)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if not drawn:  # a search read before any trial row was written
            ax.text(0.5, 0.5, "no trial recorded yet", transform=ax.transAxes, ha="center")
    if drawn:
        ax_acc.legend(fontsize=8, loc="best")
    _save(fig, path)
    return drawn


def anytime_curves(epochs: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Best validation accuracy so far against wall time and cumulative trial-epochs."""
    if "experiment" not in epochs:
        epochs = epochs.assign(experiment="")
    curve = anytime(epochs)
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, group in curve.groupby("experiment", sort=True):
        ax_t.step(group["wall_s"] / 60, group["best_so_far"], where="post", label=name or None)
        ax_e.step(group["trial_epochs"], group["best_so_far"], where="post", label=name or None)
    ax_t.set(title="Best validation accuracy so far", xlabel="wall time (minutes)",
             ylabel="best validation accuracy")
    ax_e.set(title="Best validation accuracy so far", xlabel="trial-epochs run",
             ylabel="best validation accuracy")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
    if curve["experiment"].nunique() > 1:
        ax_t.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return curve


def _range(spec: Any) -> tuple[float, float, bool] | None:
    """(low, high, log) of a numeric space entry, or None for fixed or non-numeric ones."""
    if not isinstance(spec, dict) or len(spec) != 1:
        return None
    kind, args = next(iter(spec.items()))
    if kind in RANGE_KINDS:
        return float(args[0]), float(args[1]), kind in LOG_KINDS
    numeric = [a for a in args if isinstance(a, int | float) and not isinstance(a, bool)]
    if kind in ("choice", "grid") and len(numeric) == len(args) and len(set(numeric)) >= 3:
        return float(min(numeric)), float(max(numeric)), False
    return None


def edge_flags(trials: pd.DataFrame, space: dict[str, Any], top: int | None = None
               ) -> dict[str, str]:
    """Parameters whose best trials all sit at one end of the searched range.

    The best `top` trials (default: 10% of them, at least 3) are placed in [0, 1] along each
    numeric range (in log space for log-scaled ones); if all lie in the lowest or highest 15%,
    the range probably cuts off the optimum and should move that way. Fewer than 3 ranked
    trials flag nothing: one or two sit at an edge by chance too often to say so.
    """
    best = ranked(trials.assign(experiment=trials.get("experiment", "")))
    k = top or max(3, math.ceil(0.1 * len(best)))
    best = best.head(k)
    flags = {}
    if len(best) < 3:
        return flags
    for key, spec in space.items():
        bounds, col = _range(spec), PARAM_PREFIX + key
        if bounds is None or col not in best:
            continue
        low, high, log = bounds
        values = best[col].astype(float).to_numpy()
        if log:
            pos = (np.log(values) - math.log(low)) / (math.log(high) - math.log(low))
        else:
            pos = (values - low) / (high - low)
        if (pos <= EDGE).all():
            flags[key] = "low"
        elif (pos >= 1 - EDGE).all():
            flags[key] = "high"
    return flags


def hyperparameter_axes(trials: pd.DataFrame, space: dict[str, Any] | str, path: Path
                        ) -> dict[str, Any]:
    """Best validation accuracy against each sampled hyperparameter; edges flagged."""
    if isinstance(space, str):
        space = json.loads(space)
    sampled = [k for k, v in space.items() if isinstance(v, dict)
               and PARAM_PREFIX + k in trials]
    flags = edge_flags(trials, space)
    scored = trials[trials["best_val_accuracy"].notna()]
    cols = 3
    rows = max(1, math.ceil(len(sampled) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    points = {}
    for ax, key in zip(axes.flat, sampled, strict=False):
        x = scored[PARAM_PREFIX + key]
        y = scored["best_val_accuracy"]
        bounds = _range(space[key])
        if bounds is None:  # categorical: one column of points per value
            options = [v for v in space[key].get("choice", space[key].get("grid", []))]
            labels = [str(v) for v in options] or sorted(x.astype(str).unique())
            pos = x.astype(str).map({v: i for i, v in enumerate(labels)})
            jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(pos))
            ax.scatter(pos + jitter, y, s=14, alpha=0.7)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            ax.scatter(x.astype(float), y, s=14, alpha=0.7)
            low, high, log = bounds
            if log:
                ax.set_xscale("log")
                ax.set_xlim(low / 1.25, high * 1.25)
            else:
                pad = 0.05 * (high - low)
                ax.set_xlim(low - pad, high + pad)
        title = key
        if key in flags:
            title += f"  [best at {flags[key]} edge]"
            ax.set_title(title, color="firebrick", fontsize=10)
        else:
            ax.set_title(title, fontsize=10)
        ax.set_xlabel(key + (" (log scale)" if bounds and bounds[2] else ""), fontsize=9)
        ax.set_ylabel("best validation accuracy", fontsize=9)
        ax.grid(alpha=0.3)
        points[key] = pd.DataFrame({"value": x.to_numpy(), "best_val_accuracy": y.to_numpy()})
    for ax in list(axes.flat)[len(sampled):]:
        ax.set_visible(False)
    fig.suptitle("Validation accuracy against each hyperparameter", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # keep the suptitle clear of the top row
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return {"points": points, "flags": flags}


def scheduler_view(trials: pd.DataFrame, max_epochs: int, path: Path,
                   rungs: list[int] | None = None) -> pd.Series:
    """How many trials reached each epoch (the survivors of each rung)."""
    epochs = np.arange(1, max_epochs + 1)
    reached = pd.Series([(trials["epochs"] >= e).sum() for e in epochs], index=epochs,
                        name="trials")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(epochs, reached.to_numpy(), color="steelblue")
    for rung in rungs or []:
        ax.axvline(rung + 0.5, color="gray", ls="--", lw=1)
    ax.set(title="Trials that reached each epoch", xlabel="epoch", ylabel="trials")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return reached


def dataset_overview(x: np.ndarray, y: np.ndarray, class_names: tuple[str, ...], path: Path,
                     per_class: int = 6) -> dict[str, np.ndarray]:
    """Sample images per class, class counts and the mean image per class."""
    k = len(class_names)
    counts = np.bincount(y, minlength=k)
    means = np.stack([x[y == c].mean(axis=0) if counts[c] else np.zeros(x.shape[1:])
                      for c in range(k)])
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(k, per_class + 3, width_ratios=[1] * per_class + [0.3, 1, 3.2])
    rng = np.random.default_rng(0)
    for c in range(k):
        idx = np.flatnonzero(y == c)
        picks = rng.choice(idx, min(per_class, len(idx)), replace=False) if len(idx) else []
        for j in range(per_class):
            ax = fig.add_subplot(grid[c, j])
            if j < len(picks):
                ax.imshow(x[picks[j]], cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j == 0:  # the row's class name, aligned with its images
                ax.set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=9)
        ax = fig.add_subplot(grid[c, per_class + 1])
        ax.imshow(means[c], cmap="gray_r")
        ax.axis("off")
        if c == 0:
            ax.set_title("mean", fontsize=9)
    ax = fig.add_subplot(grid[:, per_class + 2])
    bars = ax.barh(range(k), counts, color="steelblue")
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_yticks(range(k), [""] * k)  # rows line up with the class names on the left
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_xlim(0, counts.max() * 1.2 if counts.max() else 1)
    ax.set(title="Images per class", xlabel="images")
    fig.suptitle(f"Dataset overview: {per_class} samples per class, mean image per class, "
                 f"class counts ({len(y):,} images)", fontsize=12)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.92, bottom=0.07, wspace=0.1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return {"counts": counts, "means": means}


def confusion_heatmap(cm: np.ndarray, class_names: tuple[str, ...], path: Path,
                      title: str = "Confusion matrix (test set)") -> np.ndarray:
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    im = ax.imshow(cm, cmap="Blues")
    k = len(class_names)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(k), class_names, fontsize=9)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
    _save(fig, path)
    return cm


def misclassified_grid(x: np.ndarray, y: np.ndarray, probs: np.ndarray,
                       class_names: tuple[str, ...], path: Path, n: int = 24) -> np.ndarray:
    """The most confidently wrong test images, with true and predicted labels."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    cols = 6
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(x[i], cmap="gray_r")
        ax.set_title(f"true: {class_names[y[i]]}\npred: {class_names[pred[i]]} "
                     f"({probs[i, pred[i]]:.0%})", fontsize=8)
    fig.suptitle(f"Misclassified test images, most confident first ({len(wrong)} shown)",
                 fontsize=11)
    _save(fig, path)
    return wrong
