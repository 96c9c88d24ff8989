"""`--searcher tpe-rungs` (search.searchers.RungTPE) driven directly, as Tune drives a Searcher.

The metric is a known function of the config, so what the searcher learned shows in where it
draws next. End-to-end runs under Ray are in test_search.py.
"""

import json
import statistics

import pytest
from ray import tune

from search.searchers import RungTPE

SPACE = {"x": tune.uniform(0.0, 1.0), "units": tune.choice([8, 16, 32])}


def _searcher(**kw) -> RungTPE:
    s = RungTPE(**kw)
    assert s.set_search_properties("val_accuracy", "max", SPACE)
    return s


def _report(s: RungTPE, trial_id: str, epoch: int, value: float) -> None:
    s.on_trial_result(trial_id, {"training_iteration": epoch, "val_accuracy": value})


def _score(config: dict, peak: float) -> float:
    return 1.0 - abs(config["x"] - peak) + (0.05 if config["units"] == 16 else 0.0)


def _run(s: RungTPE, prefix: str, n: int, epoch: int, peak: float) -> list[dict]:
    """Draw n configs, each reporting its score at `epoch` before the next is drawn."""
    drawn = []
    for i in range(n):
        config = s.suggest(f"{prefix}{i}")
        _report(s, f"{prefix}{i}", epoch, _score(config, peak))
        drawn.append(config)
    return drawn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_until_an_epoch_has_enough_results_then_draws_near_the_best(seed):
    s = _searcher(seed=seed, min_points=8, random_fraction=0.0)
    _run(s, "r", 7, epoch=1, peak=0.85)
    assert s.budget() is None  # 7 results at epoch 1: still drawing at random
    _run(s, "s", 1, epoch=1, peak=0.85)
    assert s.budget() == 1
    learned = _run(s, "t", 30, epoch=1, peak=0.85)
    # Uniform draws land 0.37 from 0.85 on average and pick 16 units a third of the time;
    # TPE's draws close in on both (0.14-0.23 and 10-12 of 20 over seeds 0-5).
    assert statistics.mean(abs(c["x"] - 0.85) for c in learned[10:]) < 0.25
    assert sum(c["units"] == 16 for c in learned[10:]) >= 9


def test_fits_the_highest_epoch_that_enough_trials_reached():
    # Epoch 1 favours x near 0.1, epoch 3 near 0.9 (a config that learns fast is not the one
    # that ends best). Once 6 trials reported epoch 3, draws follow epoch 3.
    s = _searcher(seed=0, min_points=6, random_fraction=0.0)
    early = _run(s, "a", 20, epoch=1, peak=0.1)
    assert s.budget() == 1
    assert statistics.mean(c["x"] for c in early[10:]) < 0.35
    for i in range(6):
        _report(s, f"a{i}", 3, _score(early[i], 0.9))
    assert s.budget() == 3
    late = _run(s, "b", 20, epoch=3, peak=0.9)
    assert statistics.mean(c["x"] for c in late[5:]) > 0.65


def test_what_counts_as_an_observation():
    s = _searcher(seed=0, min_points=2)
    a, b = s.suggest("a"), s.suggest("b")
    assert set(a) == set(b) == {"x", "units"}
    _report(s, "a", 1, 0.4)
    _report(s, "a", 1, 0.9)  # the same epoch again (a retry from a checkpoint): the first stays
    _report(s, "b", 1, float("nan"))  # nothing to learn from
    _report(s, "unknown", 1, 0.5)  # not drawn by this searcher
    s.on_trial_result("b", {"training_iteration": 1})  # no metric
    assert s.observations(1) == {"a": 0.4}
    # Tune hands the result that ends a trial to on_trial_complete; an error teaches nothing.
    s.on_trial_complete("b", {"training_iteration": 2, "val_accuracy": 0.7})
    s.on_trial_complete("a", {"training_iteration": 2, "val_accuracy": 0.8}, error=True)
    assert s.observations(2) == {"b": 0.7}


def test_state_is_json_and_a_restored_searcher_goes_on_learning(tmp_path):
    s = _searcher(seed=0, min_points=5, random_fraction=0.0)
    drawn = _run(s, "r", 12, epoch=1, peak=0.85)
    path = tmp_path / "searcher-state"
    s.save(str(path))
    state = json.loads(path.read_text())  # plain JSON, no pickle
    assert len(state["params"]) == 12 and len(state["seen"]["1"]) == 12

    # As Tune's --resume does it: no search properties set, all of it from the file.
    restored = RungTPE(seed=0, min_points=5, random_fraction=0.0)
    restored.restore(str(path))
    assert restored.observations(1) == s.observations(1) and restored.budget() == 1
    after = _run(restored, "n", 25, epoch=1, peak=0.85)
    assert statistics.mean(abs(c["x"] - 0.85) for c in after[5:]) < 0.25  # uniform: 0.37
    # Before any epoch has enough results a resumed search draws new configs, not the first ones.
    fresh = RungTPE(seed=0, min_points=100)
    fresh.restore(str(path))
    assert [fresh.suggest(f"f{i}")["x"] for i in range(3)] != [c["x"] for c in drawn[:3]]


def test_bad_settings_and_a_missing_space_are_refused():
    with pytest.raises(ValueError, match="min_points"):
        RungTPE(min_points=0)
    with pytest.raises(ValueError, match="random_fraction"):
        RungTPE(random_fraction=1.5)
    with pytest.raises(RuntimeError, match="search space"):
        RungTPE().suggest("t")
    s = _searcher()
    assert not s.set_search_properties("val_accuracy", "max", SPACE)  # the space is set once
