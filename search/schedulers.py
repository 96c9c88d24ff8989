"""Promotion-based ASHA for Ray Tune (`--scheduler asha-promote`), and Ray's ASHA, median
stopping rule and Hyperband made to resume (`asha`, `median`, `hyperband`).

Ray's `AsyncHyperBandScheduler` (`--scheduler asha`) decides stop-or-continue the moment a trial
reaches a rung, against the trials recorded there so far: the first trial at a rung always
continues and the second continues if it beats the first, so with a few dozen configs the first
ones often run every epoch. This is the ASHA of Li et al., "A System for Massively Parallel
Hyperparameter Tuning" (MLSys 2020): a trial that reaches a rung is paused (checkpointed, its
worker handed on) unless it already ranks in the top floor(n / factor) of the n trials recorded
at that rung. Whenever a worker can take work, the best paused trial that has become promotable
(highest rung first) resumes from its checkpoint before any new config starts.

With a finite number of configs floor(n / factor) can leave a rung with no promotion at all
(two trials at a rung, factor 3), so when no new config is waiting to start (the searcher is
done, or nothing runs at all) promotion goes by ceil(n / factor) instead: the best trial always
reaches max_t. When nothing runs, nothing waits and nothing is promotable, the paused trials
left are stopped.

Paused trials count as live for a concurrency limit (`--max-concurrent`), which would let them
block new configs forever, so run.py refuses the two together; the trial's resources set how
many run at once.

A `--resume`d search fills the rungs again from the epochs on record (`OnRecord`, below): each
trial's score at each rung it reached, promoted from those it went past. Tune brings every
unfinished trial back as pending, which it would start as soon as a worker is free; a trial
whose last epoch on record is a rung it was not promoted from, and whose checkpoint Tune
knows is of that epoch, waited there, and waits again (paused) until it is promoted. One
killed just after its promotion, before its next epoch, is judged again at that rung; one
Tune restores from an older checkpoint is judged when it reports the rung's epoch again.

Hyperband. Ray Tune does not save a scheduler with the experiment: `--resume` builds a new one
and adds every trial of the experiment to it, finished ones included. Ray's
`HyperBandScheduler` puts each in a bracket, and a bracket halves only when all its trials
have reached the rung, which a finished trial never does: a resumed trial that reaches a rung
beside one waits, paused, for ever (checked: `--resume` of a `max_t` 3 search stopped with
two trials at epoch 1 of its 3x1 -> 1x3 bracket was still waiting after 150 s, for a few
seconds of work). `ResumableHyperBand` leaves finished and failed trials out of its brackets;
the unfinished ones fill new brackets as new configs would.

ASHA and the median rule. The same new scheduler starts with empty rungs, so after a resume
the first trials to reach each rung continue whatever they score, and trials already past a
rung are judged at it again against the few results reported since; the median rule has no
results to take a median of until trials report again. `ResumableASHA` and `ResumableMedian`
fill their state again from the validation accuracies on record (`OnRecord`: search/run.py
reads them from the experiment's epochs, and from Tune's result.json for epochs a killed
driver had not written yet, before Tune restores it), so a resumed search stops
what the search would have stopped. A trial back from an earlier checkpoint (a retry, or a
resume) reports some epochs again, and Tune hands a trial the rule stops its last result a
second time (`on_trial_complete`); Ray's median rule counts each such epoch twice in the
trial's running mean, `ResumableMedian` keeps the latest result only (so a search that is not
resumed differs from Ray's too: a stopped trial's last epoch weighs once, not twice).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    TrialScheduler,
)


class PromotingASHA(FIFOScheduler):
    """ASHA with pause-and-promote; see the module docstring."""

    def __init__(self, max_t: int, rungs: list[int], reduction_factor: float,
                 metric: str | None = None, mode: str | None = None,
                 time_attr: str = "training_iteration"):
        super().__init__()
        if reduction_factor <= 1 or any(not 1 <= r < max_t for r in rungs):
            raise ValueError(f"need reduction_factor > 1 and rungs in [1, {max_t}), "
                             f"got {reduction_factor}, {rungs}")
        self._max_t = max_t
        self._factor = reduction_factor
        self._time_attr = time_attr
        self._metric, self._mode = metric, mode
        self.rungs = sorted(set(rungs))  # epochs at which a trial waits for promotion
        self._recorded: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self._promoted: dict[int, set[str]] = {r: set() for r in self.rungs}
        self._paused_at: dict[str, int] = {}  # trial id -> the rung it waits at
        self._chosen: set[str] = set()  # promoted, not running yet: they go first

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if self._metric and metric and self._metric != metric:
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        """On a `--resume`: the trial's place at each rung again (see the module docstring)."""
        scores = OnRecord.scores.get(trial.trial_id)
        if not scores:
            return
        tid, last = trial.trial_id, max(scores)
        for rung in self.rungs:
            if rung in scores:
                self._recorded[rung].setdefault(tid, self._score({self._metric: scores[rung]}))
                if last > rung:
                    self._promoted[rung].add(tid)
        saved = trial.latest_checkpoint_result  # what Tune would restore it from
        at = saved.metrics.get(self._time_attr) if saved is not None else None
        if (last in self._recorded and at == last
                and trial.status in (Trial.PENDING, Trial.PAUSED)):
            # Tune files the trial under its status after this call: paused, it waits for a
            # promotion instead of starting as a new config would. (From an older checkpoint,
            # or none, it runs and is judged when it reports the rung's epoch again.)
            trial.set_status(Trial.PAUSED)
            self._paused_at[tid] = last

    # ---------------------------------------------------------------- decisions

    def _score(self, result: dict[str, Any]) -> float:
        value = result.get(self._metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return -math.inf
        return float(value) if self._mode != "min" else -float(value)

    def promotable(self, rung: int, trial_id: str, finishing: bool = False) -> bool:
        """Is `trial_id` in the top floor(n / factor) (ceil when `finishing`) of its rung and
        not promoted from it yet?"""
        return trial_id in self._candidates(rung, finishing)

    def _candidates(self, rung: int, finishing: bool) -> list[str]:
        """The rung's top floor(n / factor) (ceil when `finishing`) not yet promoted, best first."""
        recorded = self._recorded[rung]
        n = len(recorded)
        k = math.ceil(n / self._factor) if finishing else math.floor(n / self._factor)
        # Ties go to the trial recorded first (dicts keep insertion order; sorted is stable).
        top = sorted(recorded, key=recorded.__getitem__, reverse=True)[:k]
        return [tid for tid in top if tid not in self._promoted[rung]]

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        t = int(result.get(self._time_attr, 0))
        if t >= self._max_t:
            return TrialScheduler.STOP
        tid = trial.trial_id
        self._chosen.discard(tid)
        if t in self._recorded and tid not in self._promoted[t]:
            # New at the rung, or back at it after a --resume from an older checkpoint: judged
            # with its latest score. (Promoted from it, a retry re-reporting it goes on.)
            self._recorded[t][tid] = self._score(result)
            if self.promotable(t, tid):
                self._promoted[t].add(tid)
                return TrialScheduler.CONTINUE
            self._paused_at[tid] = t
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE

    def _forget(self, trial: Trial) -> None:
        self._chosen.discard(trial.trial_id)
        self._paused_at.pop(trial.trial_id, None)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._forget(trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._forget(trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._forget(trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """A promoted trial first, then a new config; stop the paused rest when all is done.

        Tune calls this before it hands a free (or cached) worker to any other pending trial,
        and calls it again every step, so returning the promoted trial until it runs keeps its
        place ahead of the new configs queued for workers.
        """
        trials = tune_controller.get_trials()
        by_id = {t.trial_id: t for t in trials}
        for tid in list(self._chosen):
            trial = by_id.get(tid)
            if trial is not None and trial.status in (Trial.PENDING, Trial.PAUSED):
                return trial
            self._chosen.discard(tid)
        new = [t for t in trials if t.status == Trial.PENDING]
        running = any(t.status == Trial.RUNNING for t in trials)
        searched = tune_controller.search_alg.is_finished()
        # No new config to start: one that is not coming (searcher done) or a worker that
        # would sit idle. Either way waiting for more trials at a rung gains nothing.
        finishing = not new and (searched or not running)
        promote = self._best_promotable(by_id, finishing)
        if promote is not None:
            rung = self._paused_at.pop(promote.trial_id)
            self._promoted[rung].add(promote.trial_id)
            self._chosen.add(promote.trial_id)
            return promote
        if new:
            return new[0]
        if not running and searched:  # nothing runs, waits or can be promoted: all done
            for trial in trials:
                if trial.status == Trial.PAUSED:
                    tune_controller.stop_trial(trial)  # calls on_trial_remove -> _forget
        return None

    def _best_promotable(self, by_id: dict[str, Trial], finishing: bool) -> Trial | None:
        for rung in reversed(self.rungs):
            for tid in self._candidates(rung, finishing):
                trial = by_id.get(tid)
                if self._paused_at.get(tid) == rung and trial and trial.status == Trial.PAUSED:
                    return trial
        return None

    def debug_string(self) -> str:
        sizes = ", ".join(f"{r}: {len(self._recorded[r])} recorded / "
                          f"{len(self._promoted[r])} promoted" for r in self.rungs)
        return f"ASHA (promotion-based), rungs {sizes}"


class ResumableHyperBand(HyperBandScheduler):
    """Ray's Hyperband, except that trials that will not run again join no bracket."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # only a --resume adds these
            return
        super().on_trial_add(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        if trial in self._trial_info:
            super().on_trial_remove(tune_controller, trial)


class OnRecord:
    """What a `--resume` fills the schedulers' state with again: trial id -> {epoch: the
    metric} (numbers: epochs without one are left out), set by run.py before Tune restores the
    experiment and cleared after. (Tune restores the scheduler pickled when the search
    started: nothing can be handed to it.)"""

    scores: dict[str, dict[int, float]] = {}


class ResumableASHA(AsyncHyperBandScheduler):
    """Ray's ASHA, whose rungs a `--resume` fills again from the epochs on record."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        scores = OnRecord.scores.get(trial.trial_id)
        if not scores:
            return
        for milestone, recorded in self._trial_info[trial.trial_id]._rungs:
            # Ray records a trial at a rung with its first result at or past the milestone
            # (2.5 epochs with a factor of 2.5: epoch 3), so that epoch's score goes there.
            score = scores.get(math.ceil(milestone))
            if score is not None:
                recorded.setdefault(trial.trial_id, self._metric_op * score)


class ResumableMedian(MedianStoppingRule):
    """Ray's median stopping rule, whose results a `--resume` fills again from the epochs on
    record (it compares a trial with the running means of every other trial's results)."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        scores = OnRecord.scores.get(trial.trial_id)
        if scores and not self._results.get(trial):
            self._results[trial] = [{self._time_attr: epoch, self._metric: score}
                                    for epoch, score in sorted(scores.items())]

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        self._rewind(trial, result)
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._rewind(trial, result)
        super().on_trial_complete(tune_controller, trial, result)

    def _rewind(self, trial: Trial, result: dict) -> None:
        """An epoch reported again (a trial back from an earlier checkpoint: a retry, a resume
        of one killed between a result and its checkpoint; the last result of a trial this
        rule stopped, which Tune hands to `on_trial_complete` as well) replaces the results
        the trial had from it on: Ray's rule would count it twice in the running mean."""
        time, past = result.get(self._time_attr), self._results.get(trial)
        if time is not None and past and past[-1].get(self._time_attr, -math.inf) >= time:
            self._results[trial] = [r for r in past if r.get(self._time_attr, -math.inf) < time]
