"""Ray Tune's own per-trial logs, holding no files open for the trials that wait.

Tune writes each trial's results to `result.json`, `progress.csv` and a TensorBoard event
file, through three logger callbacks that open a trial's files when it starts and close them
when it ends. A trial that pauses has not ended: it keeps all three open, with the pipe and
the thread of its TensorBoard writer, about 5 file descriptors and 2 threads in the driver.
Under `asha-promote` most trials wait paused at a rung until they are promoted or the search
ends, so these add up: a 400-config search of a tiny space (two trials at a time) ended with
"Too many open files" (a traceback, exit 1) under the common limit of 1,024 open files
(`ulimit -n`), 314 trials in, about 200 of them waiting. With a higher limit it finished with
1,314 descriptors and 547 threads in the driver at most; with these loggers, 54 and 40.

These are Tune's three callbacks, closing a trial's files as soon as it waits (paused, or
pending again), and, when the search ends, those of trials that never ended. When the trial
starts again Tune opens them again, as it always did: its `on_trial_start` closes a trial's
files and reopens them (appending) on every start, resumes included. The one thing the
TensorBoard writer does at a trial's end, logging its hyperparameters with its last result,
still happens for a trial stopped while it waited.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

WAITING = (Trial.PAUSED, Trial.PENDING)


class _ClosesWaiting:
    """Mixin for a Tune logger callback: after every step of Tune's loop, close the files of
    the trials that wait."""

    def _open(self) -> dict:
        """The callback's open files (or writers), by trial: the JSON and CSV loggers'."""
        return self._trial_files  # type: ignore[attr-defined]

    def _close(self, trial: Trial) -> None:
        """Close `trial`'s files and forget them; the next result or start opens them. The
        JSON and CSV loggers' own end does only that (reopened, the CSV gets no second
        header)."""
        self.log_trial_end(trial)  # type: ignore[attr-defined]

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        super().on_step_end(iteration, trials, **info)  # type: ignore[misc]
        for trial in [t for t in self._open() if t.status in WAITING]:
            self._close(trial)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Close the files of the trials that never ended (running when a time budget or a
        Ctrl+C ended the search): Tune's loggers left them open for as long as the process
        lived, which in a notebook or any caller that goes on is a leak per search."""
        super().on_experiment_end(trials, **info)  # type: ignore[misc]
        for trial in list(self._open()):
            self._close(trial)


class ResultJsonLogger(_ClosesWaiting, JsonLoggerCallback):
    """Tune's `result.json` writer (the epochs `--resume` recovers from it read it)."""


class ProgressCsvLogger(_ClosesWaiting, CSVLoggerCallback):
    """Tune's `progress.csv` writer."""


class TensorBoardLogger(_ClosesWaiting, TBXLoggerCallback):
    """Tune's TensorBoard writer (`tensorboard --logdir <experiment>/ray`)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting_result: dict[Trial, dict] = {}  # last result of each closed writer

    def _open(self) -> dict:
        return self._trial_writer

    def _close(self, trial: Trial) -> None:
        self._waiting_result[trial] = self._trial_result.pop(trial)
        self._trial_writer.pop(trial).close()

    def log_trial_start(self, trial: Trial) -> None:
        self._waiting_result.pop(trial, None)
        super().log_trial_start(trial)

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        if trial not in self._trial_writer and trial in self._waiting_result:
            # Stopped while it waited: a writer again, for its hyperparameters and result.
            result = self._waiting_result.pop(trial)
            super().log_trial_start(trial)
            self._trial_result[trial] = result
        super().log_trial_end(trial, failed)


def tune_loggers() -> list:
    """Tune's three default per-trial loggers, as above, for `RunConfig(callbacks=...)`; Tune
    adds its own only for one missing (TensorBoard's, where tensorboardX is not installed:
    Tune then warns and goes on without it, as it does by itself)."""
    loggers: list = [ProgressCsvLogger(), ResultJsonLogger()]
    try:
        loggers.append(TensorBoardLogger())
    except ImportError:
        pass
    return loggers
