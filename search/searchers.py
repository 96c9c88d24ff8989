"""`--searcher tpe-rungs`: Optuna's TPE fit on every trial's results at every epoch, as BOHB does.

Ray's `OptunaSearch` (`--searcher optuna`) tells Optuna a trial's result only when the trial
ends. Under `asha-promote` most trials wait at a rung, paused, until the search ends, so TPE
learns only from the few trials that reached max_t and draws most configs at random; under a
stopping scheduler it learns from results taken at different epochs as if they were alike.

Here each epoch's result is an observation at that epoch (the budget). A new config is drawn by a
TPE fit on the observations at the highest epoch that at least `min_points` trials have reported
(BOHB's rule: Falkner, Klein and Hutter, "BOHB: Robust and Efficient Hyperparameter Optimization
at Scale", ICML 2018, which fits its own kernel density estimator where this uses Optuna's TPE).
While no epoch has that many observations, and for `random_fraction` of the draws after that, the
config is drawn at random, so the search keeps exploring when early epochs mislead.

The state (configs drawn and observations) is saved as JSON for `--resume`, not pickled.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

TIME_ATTR = "training_iteration"  # one Tune iteration is one epoch


class RungTPE(Searcher):
    """BOHB's choice of budget with Optuna's TPE; see the module docstring."""

    CKPT_FILE_TMPL = "searcher-state-{}.json"  # what save() writes (Ray's default says .pkl)

    def __init__(self, seed: int = 0, min_points: int = 10, random_fraction: float = 1 / 3,
                 metric: str | None = None, mode: str | None = None):
        super().__init__(metric=metric, mode=mode)
        if min_points < 1 or not 0 <= random_fraction <= 1:
            raise ValueError(f"need min_points >= 1 and random_fraction in [0, 1], got "
                             f"{min_points}, {random_fraction}")
        self._seed = seed
        self._min_points = min_points
        self._random_fraction = random_fraction
        self._dists: dict[str, Any] = {}  # key -> optuna distribution
        self._params: dict[str, dict[str, Any]] = {}  # trial id -> the config drawn for it
        self._seen: dict[int, dict[str, float]] = {}  # epoch -> trial id -> metric
        self._studies: dict[int, Any] = {}  # epoch -> TPE study holding its observations
        self._coin = random.Random(seed)
        self._salt = 0  # draws made before a --resume, so a resumed search draws afresh
        self._random: Any = None  # the study that draws at random, made when first needed

    # ------------------------------------------------------------------ Ray Tune's Searcher

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        from ray.tune.search.optuna import OptunaSearch

        if self._dists:
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        self._dists = OptunaSearch.convert_search_space(config)
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._dists or self._mode not in ("min", "max") or not self._metric:
            raise RuntimeError("RungTPE needs a search space, a metric and a mode "
                               "(set_search_properties)")
        budget = self.budget()
        if budget is None or self._coin.random() < self._random_fraction:
            if self._random is None:
                self._random = self._new_study(None)
            study = self._random
        else:
            study = self._study(budget)
        params = dict(study.ask(self._dists).params)
        self._params[trial_id] = params
        return dict(params)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._observe(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        # Tune hands the result that ends a trial here, not to on_trial_result.
        if result and not error:
            self._observe(trial_id, result)

    def save(self, checkpoint_path: str) -> None:
        from optuna.distributions import distribution_to_json

        # Tune's --resume restores this searcher without setting its search properties again.
        state = {"metric": self._metric, "mode": self._mode,
                 "space": {k: distribution_to_json(d) for k, d in self._dists.items()},
                 "params": self._params,
                 "seen": {str(e): obs for e, obs in self._seen.items()}}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        from optuna.distributions import json_to_distribution

        state = json.loads(Path(checkpoint_path).read_text())
        self._metric, self._mode = state["metric"], state["mode"]
        self._dists = {k: json_to_distribution(d) for k, d in state["space"].items()}
        self._params = {tid: dict(p) for tid, p in state["params"].items()}
        self._seen = {int(e): {tid: float(v) for tid, v in obs.items()}
                      for e, obs in state["seen"].items()}
        self._studies = {}  # rebuilt from the observations when next needed
        # Fresh random streams, so the resumed search does not draw the first configs again.
        self._salt = len(self._params)
        self._coin = random.Random(f"{self._seed}/{self._salt}")
        self._random = None

    # ------------------------------------------------------------------ observations

    def budget(self) -> int | None:
        """The highest epoch at least `min_points` trials reported; None while there is none."""
        ready = [e for e, obs in self._seen.items() if len(obs) >= self._min_points]
        return max(ready) if ready else None

    def observations(self, epoch: int) -> dict[str, float]:
        """Trial id -> metric at `epoch`, for every trial that reported it."""
        return dict(self._seen.get(epoch, {}))

    def _observe(self, trial_id: str, result: dict[str, Any]) -> None:
        epoch, value = result.get(TIME_ATTR), result.get(self._metric)
        if trial_id not in self._params or epoch is None or value is None:
            return
        epoch, value = int(epoch), float(value)
        if math.isnan(value):
            return  # nothing to learn from; the trial's later epochs may still report
        seen = self._seen.setdefault(epoch, {})
        if trial_id in seen:
            return  # a retry from a checkpoint repeats epochs: keep the first report
        seen[trial_id] = value
        if epoch in self._studies:
            self._add(self._studies[epoch], trial_id, value)

    def _study(self, epoch: int) -> Any:
        if epoch not in self._studies:
            study = self._new_study(epoch)
            for trial_id, value in self._seen[epoch].items():
                self._add(study, trial_id, value)
            self._studies[epoch] = study
        return self._studies[epoch]

    def _add(self, study: Any, trial_id: str, value: float) -> None:
        import optuna

        params = self._params[trial_id]
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: self._dists[k] for k in params}, value=value))

    def _new_study(self, epoch: int | None) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seed = self._seed * 1009 + (epoch or 0) * 7 + self._salt
        if epoch is None:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:  # the random draws before TPE starts are this class's own: start at once
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=0)
        direction = "minimize" if self._mode == "min" else "maximize"
        return optuna.create_study(sampler=sampler, direction=direction)
