"""Driver-side Ray Tune callback: every epoch and every finished trial into Parquet, live.

Epoch rows are buffered and flushed every `flush_every_s` seconds and at every trial end, each
flush one atomic part file, so a crash loses at most the last few seconds (and --resume
re-runs those epochs from the trials' checkpoints). Also prints a compact progress line.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ray.tune import Callback

from results.store import PARAM_PREFIX, ExperimentStore, os_reason
from search.trainable import TRIAL_FILE

TERMINAL = ("completed", "stopped", "error", "budget", "interrupted", "abandoned")
# The signals on which Ray Tune saves its state and ends the search (Ctrl+C, and SIGUSR1).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n))


def _now() -> datetime:
    return datetime.now(UTC)


def _seconds(value: Any) -> float:
    """A duration from an epoch row: 0 where it is missing (None or NaN from Parquet)."""
    return float(value) if value is not None and value == value else 0.0


def _error_text(trial: Any) -> str:
    try:
        text = trial.get_error()
        text = str(text) if text is not None else ""
    except Exception:  # a missing error file must not break the recording
        text = ""
    if not text and getattr(trial, "error_file", None):
        try:
            with open(trial.error_file) as f:
                text = f.read()
        except OSError:
            pass
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # The last line of a traceback names the exception; keep that, it is what a person needs.
    return lines[-1].strip() if lines else "unknown error"


class ParquetRecorder(Callback):
    """Writes `epochs/` and `trials/` rows for one experiment while the search runs."""

    # On --resume Tune brings back the recorder it saved, whose store names the experiment's
    # folder as it was then; the experiment may have moved since (another --storage): the
    # driver sets where it is now, and `setup` takes it.
    relocated_to: ExperimentStore | None = None

    def __init__(self, store: ExperimentStore, fixed: dict[str, Any], scheduler: str,
                 cpus: float, gpus: float, flush_every_s: float = 2.0,
                 progress_every_s: float = 15.0, out=None):
        self.store = store
        self.fixed = dict(fixed)
        self.scheduler = scheduler
        self.cpus, self.gpus = cpus, gpus
        self.flush_every_s = flush_every_s
        self.progress_every_s = progress_every_s
        self.out = out
        self._reset()

    def _reset(self) -> None:
        self._epochs: list[dict[str, Any]] = []
        self._trials: list[dict[str, Any]] = []
        self._history: dict[str, dict[int, dict[str, Any]]] = {}
        self._started: dict[str, datetime] = {}
        self._terminal: dict[str, str] = {}
        self._last_flush = time.monotonic()
        self._last_progress = time.monotonic()
        self._t0 = time.monotonic()
        self.failed: list[str] = []
        self.interrupted = False
        self.write_error: str | None = None  # why the last flush failed; None once one works

    # Tune pickles the callback into its experiment state; the file handle stays behind.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["out"] = None
        return state

    def setup(self, **info: Any) -> None:
        """Start (or resume): seed per-trial histories from what is already on disk."""
        if ParquetRecorder.relocated_to is not None:
            self.store = ParquetRecorder.relocated_to
        self._reset()
        self._watch_stop_signals()
        self.store.sweep_tmp()
        # where rows go that no flush could write (set here: a restored recorder may predate it)
        self.aside = self.store.unwritten(self.store.read_experiment()["created_at"])
        self._take_back_aside()
        for row in self.store.read_epochs().to_dict("records"):
            self._history.setdefault(row["trial_id"], {})[int(row["epoch"])] = row
        self._backfill()
        trials = self.store.read_trials()
        # An interrupted trial goes on under --resume and gets a new row when it ends again.
        self._terminal = {t: s for t, s in zip(trials["trial_id"], trials["status"], strict=True)
                          if s != "interrupted"}

    def _take_back_aside(self) -> None:
        """Under --resume: move in the rows an earlier run had to set aside on this machine."""
        if not self.aside.folder_exists():
            return
        try:
            moved = self.store.adopt_parts(self.aside)
        except OSError as exc:
            print(f"warning: the rows set aside in {self.aside.uri()} still cannot be written "
                  f"to {self.store.uri()} ({os_reason(exc)}); they stay there", file=sys.stderr,
                  flush=True)
            return
        shutil.rmtree(self.aside.path, ignore_errors=True)
        print(f"took back {moved} part file(s) of rows an earlier run had set aside in "
              f"{self.aside.uri()}", file=sys.stderr, flush=True)

    def _watch_stop_signals(self) -> None:
        """Note a stop signal, then hand it to the handler Tune installed for it.

        Tune ends the search the same way for a signal and for the time budget; the note is
        what tells the trials' rows which it was. Handlers can only be set from the main thread.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            tunes = signal.getsignal(sig)
            if not callable(tunes):
                continue

            def note(signum: int, frame: Any, tunes=tunes) -> None:
                self.interrupted = True
                tunes(signum, frame)

            signal.signal(sig, note)
        # SIGTERM (kill, `docker stop`, Kubernetes, Slurm) otherwise ends the driver at once
        # (ray.init's handler exits), like a hard kill: here it stops the search as Ctrl+C
        # does. The handler it replaces comes back for a second SIGTERM; run.run_search puts
        # back the caller's handlers when the search ends.
        tunes, before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        if callable(tunes) and before is not signal.SIG_IGN:
            before = signal.SIG_DFL if before is None else before  # None: set outside Python

            def on_term(signum: int, frame: Any, tunes=tunes, before=before) -> None:
                signal.signal(signal.SIGTERM, before)
                tunes(signal.SIGINT, frame)

            signal.signal(signal.SIGTERM, on_term)

    def _backfill(self) -> None:
        """Recover epochs Tune logged (result.json) that a crash kept from reaching Parquet.

        Results reach Parquet in flushes a few seconds apart; if the driver died in between,
        a resumed trial restarts after its last checkpoint and would never re-report them.
        """
        for trial_id, epoch, result in self.store.ray_results():
            if epoch not in self._history.get(trial_id, {}):
                row = self._epoch_row(trial_id, result,
                                      datetime.fromtimestamp(result.get("timestamp", 0), UTC))
                self._history.setdefault(trial_id, {})[epoch] = row
                self._epochs.append(row)
        self.flush()

    # ------------------------------------------------------------------ events

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._running(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._running(trial.trial_id)
        row = self._epoch_row(trial.trial_id, result, _now())
        self._epochs.append(row)
        self._history.setdefault(trial.trial_id, {})[row["epoch"]] = row
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def _running(self, trial_id: str) -> None:
        self._started.setdefault(trial_id, _now())
        # A failed trial that runs again (--resume --retry-errored) is no longer finished: it
        # gets a new row when it ends, or when the search ends before it does.
        if self._terminal.get(trial_id) == "error":
            del self._terminal[trial_id]

    @staticmethod
    def _epoch_row(trial_id: str, result: dict, timestamp: datetime) -> dict[str, Any]:
        return {
            "trial_id": trial_id,
            "epoch": int(result["epoch"]),
            "attempt": int(result.get("attempt", 0)),
            "timestamp": timestamp,
            "loss": result.get("loss"),
            "accuracy": result.get("accuracy"),
            "val_loss": result.get("val_loss"),
            "val_accuracy": result.get("val_accuracy"),
            "lr": result.get("lr"),
            "epoch_time_s": result.get("epoch_time_s"),
            "train_time_s": result.get("train_time_s"),
            "samples_per_s": result.get("train_samples_per_s"),
            "node": result.get("node"),
            "node_ip": result.get("node_ip"),
            "gpu_ids": result.get("gpu_ids", ""),
            "data_sha256": result.get("data_sha256"),
            "precision": result.get("precision"),
        }

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=_error_text(trial))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_flush >= self.flush_every_s:
            self.flush()
        if self.progress_every_s and now - self._last_progress >= self.progress_every_s:
            self._last_progress = now
            self.print_progress(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Trials that a stop signal or the time budget cut off (or kept from starting) get a
        # terminal row too.
        for trial in trials:
            if trial.trial_id not in self._terminal:
                self._finish(trial, error=None, cut="interrupted" if self.interrupted else "budget")
        self._abandon_forgotten({trial.trial_id for trial in trials})
        self.flush()
        if self._epochs or self._trials:  # the last chance to keep them: this machine's disk
            self._set_aside()
        self.print_progress(trials)

    # ------------------------------------------------------------------ rows

    def _abandon_forgotten(self, known: set[str]) -> None:
        """A terminal row for each trial with epochs on disk that Ray Tune no longer knows.

        Tune saves its experiment state every so often; a trial it started after the last save
        is unknown to the run that `--resume` starts after a hard stop, which draws a new config
        in its place (a searcher that names trials at random) or reruns the same one under the
        same id (the random searcher: nothing to do here). The trial's config comes back from
        the file its checkpoints carry.
        """
        forgotten = [t for t in self._history if t not in self._terminal and t not in known]
        if not forgotten:
            return
        configs = {c.get("trial_id"): c.get("config") for c in self.store.ray_json(TRIAL_FILE)
                   if isinstance(c.get("config"), dict)}
        for trial_id in forgotten:
            rows = self._history[trial_id].values()
            # The run that saw it start died: its time is its epochs', first start to last end.
            began = min(r["timestamp"] - timedelta(seconds=_seconds(r.get("epoch_time_s")))
                        for r in rows)
            self._record(trial_id, configs.get(trial_id, {}), "abandoned",
                         f"abandoned at epoch {max(self._history[trial_id])}: it started after "
                         "Ray Tune last saved its state, and the search went on under --resume "
                         "without it", started=began, ended=max(r["timestamp"] for r in rows))

    def _finish(self, trial: Any, error: str | None, cut: str | None = None) -> None:
        trial_id = trial.trial_id
        history = self._history.get(trial_id, {})
        epochs = max(history) if history else 0
        max_epochs = int({**self.fixed, **trial.config}.get("epochs", 0))
        if error is not None:
            status, reason = "error", f"error at epoch {epochs + 1}: {error}"
            self.failed.append(trial_id)
        elif epochs >= max_epochs > 0:
            status, reason = "completed", "completed"
        elif cut == "interrupted":
            status = "interrupted"
            reason = (f"search interrupted at epoch {epochs}" if history
                      else "search interrupted before the trial started") + \
                "; --resume continues it"
        elif cut and not history and trial_id not in self._started:
            status, reason = "budget", "time budget ended the search before the trial started"
        elif cut:
            status, reason = "budget", f"time budget ended the search at epoch {epochs}"
        else:
            status, reason = "stopped", f"stopped by {self.scheduler} at epoch {epochs}"
        self._record(trial_id, trial.config, status, reason, error,
                     failures=int(getattr(trial, "num_failures", 0) or 0))

    def _record(self, trial_id: str, config: dict[str, Any], status: str, reason: str,
                error: str | None = None, failures: int = 0, started: datetime | None = None,
                ended: datetime | None = None) -> None:
        """Write a trial's terminal row from its recorded epochs (ends now unless `ended`)."""
        history = self._history.get(trial_id, {})
        epochs = max(history) if history else 0
        accs = {e: r["val_accuracy"] for e, r in history.items() if r["val_accuracy"] is not None}
        best_epoch = max(accs, key=lambda e: (accs[e], -e)) if accs else None
        last = history.get(epochs, {})
        started = started or self._started.get(trial_id)
        now = _now()
        end = ended or now
        row = {
            "trial_id": trial_id,
            "family": {**self.fixed, **config}.get("model"),
            "status": status,
            "stop_reason": reason,
            "epochs": epochs,
            "best_val_accuracy": accs.get(best_epoch) if best_epoch else None,
            "best_epoch": best_epoch,
            "last_val_accuracy": last.get("val_accuracy"),
            "start_time": started,
            "end_time": end,
            "wall_time_s": (end - started).total_seconds() if started else None,
            "train_time_s": sum((r.get("epoch_time_s") or 0.0) for r in history.values()),
            "cpus": self.cpus,
            "gpus": self.gpus,
            "node": last.get("node"),
            "gpu_ids": last.get("gpu_ids"),
            "data_sha256": last.get("data_sha256"),
            "precision": last.get("precision"),
            "failures": failures,
            "error": error,
            "written_at": now,
        }
        for key, value in {**self.fixed, **config}.items():
            row[PARAM_PREFIX + key] = value
        self._trials.append(row)
        self._terminal[trial_id] = status
        self.flush()

    def flush(self) -> None:
        """Write the buffered rows, epochs first (a trial row never precedes its epochs).

        A write that fails (a full disk, a bucket that stops answering) keeps the rows for the
        next flush, a few seconds on, and the search goes on: a passing outage loses nothing.
        """
        self._last_flush = time.monotonic()
        try:
            if self._epochs:
                self.store.append_epochs(self._epochs)
                self._epochs = []
            if self._trials:
                self.store.append_trials(self._trials)
                self._trials = []
        except OSError as exc:
            if self.write_error is None:
                print(f"warning: cannot write results to {self.store.uri()} ({os_reason(exc)}); "
                      f"{len(self._epochs)} epoch and {len(self._trials)} trial row(s) kept "
                      f"in memory, retried every {self.flush_every_s:g} s", file=sys.stderr,
                      flush=True)
            self.write_error = os_reason(exc)
            return
        if self.write_error is not None:
            print(f"results written to {self.store.uri()} again", file=sys.stderr, flush=True)
        self.write_error = None

    def _set_aside(self) -> None:
        """Write the rows no flush could write to `self.aside` on this machine, which
        `search/run.py`'s report reads and names, and --resume takes back."""
        aside = self.aside
        try:
            aside.append_epochs(self._epochs)
            self._epochs = []
            aside.append_trials(self._trials)
            self._trials = []
        except OSError as exc:
            print(f"error: {len(self._epochs)} epoch and {len(self._trials)} trial row(s) could "
                  f"be written neither to {self.store.uri()} ({self.write_error}) nor to "
                  f"{aside.uri()} ({os_reason(exc)}): they are lost", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ progress

    def print_progress(self, trials: list) -> None:
        counts = {s: 0 for s in ("running", "paused", "pending", *TERMINAL)}
        for trial in trials:
            status = self._terminal.get(trial.trial_id)
            if status is None:
                status = {"RUNNING": "running", "PAUSED": "paused"}.get(trial.status, "pending")
            counts[status] += 1
        best = None
        for trial_id, history in self._history.items():
            for epoch, row in history.items():
                acc = row["val_accuracy"]
                if acc is not None and (best is None or acc > best[0]):
                    best = (acc, trial_id, epoch)
        elapsed = time.monotonic() - self._t0
        parts = [f"{counts['running']} running", f"{counts['pending']} pending"]
        if counts["paused"]:
            parts.append(f"{counts['paused']} paused")
        parts += [f"{counts['stopped']} stopped early", f"{counts['completed']} done"]
        if counts["budget"]:
            parts.append(f"{counts['budget']} cut by budget")
        if counts["interrupted"]:
            parts.append(f"{counts['interrupted']} interrupted")
        if counts["error"]:
            parts.append(f"{counts['error']} failed")
        line = f"[{elapsed:6.0f}s] " + " | ".join(parts)
        if best:
            line += f" | best val_accuracy {best[0]:.4f} ({best[1]}, epoch {best[2]})"
        print(line, file=self.out or sys.stdout, flush=True)
