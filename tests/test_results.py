"""Offline analysis on synthetic Parquet experiments (no training, no Ray)."""

import io
import json
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from results import leaderboard as lb
from results import plots
from results.__main__ import main as results_main
from results.store import EPOCH_SCHEMA, ExperimentStore, canonical_epochs
from results.synthetic import write_synthetic
from tests.conftest import REPO


@pytest.fixture
def two(tmp_path):
    a = write_synthetic(str(tmp_path), "exp-a", trials=40, max_epochs=9, seed=1,
                        searcher="random")
    b = write_synthetic(str(tmp_path), "exp-b", trials=30, max_epochs=9, seed=2,
                        searcher="optuna")
    return tmp_path, a, b


def test_leaderboard_orders_by_best_accuracy(two):
    root, a, _ = two
    exps = lb.load([str(root / "exp-a")])
    board = lb.leaderboard(exps.trials, top=5)
    assert len(board) == 5
    assert board["best_val_accuracy"].is_monotonic_decreasing
    truth = exps.trials.sort_values("best_val_accuracy", ascending=False)["trial_id"].head(5)
    assert board["trial"].tolist() == truth.tolist()
    assert {"learning_rate", "dropout", "batch_size"} <= set(board.columns)
    assert "model" not in board.columns  # fixed params are not "key" params


def test_the_leaderboard_shows_the_sampled_params_of_a_one_trial_search(tmp_path):
    # Nothing varies between the trials of a one-trial search: the space says what was sampled
    write_synthetic(str(tmp_path), "one", trials=1, max_epochs=3, seed=1)
    out = io.StringIO()
    assert results_main(["leaderboard", str(tmp_path / "one"), "--format", "csv"], out=out) == 0
    header = out.getvalue().splitlines()[0].split(",")
    assert {"learning_rate", "dropout", "batch_size"} <= set(header)
    assert "model" not in header  # fixed in the space


def test_ties_share_a_rank_and_break_deterministically():
    t = pd.DataFrame({
        "trial_id": ["c", "a", "b", "d"], "family": "mlp", "status": "completed",
        "best_val_accuracy": [0.9, 0.9, 0.9, 0.8], "best_epoch": [3, 5, 3, 1],
        "last_val_accuracy": 0.8, "epochs": 5, "train_time_s": [20.0, 10.0, 10.0, 5.0],
    })
    board = lb.leaderboard(t, top=4)
    # Equal accuracy: the earlier best epoch first, then less time, then trial id.
    assert board["trial"].tolist() == ["b", "c", "a", "d"]
    assert board["rank"].tolist() == [1, 1, 1, 4]


def test_canonical_view_keeps_latest_attempt():
    ts = pd.Timestamp("2026-01-01", tz="UTC")
    raw = pd.DataFrame({
        "trial_id": ["t", "t", "t", "t"], "epoch": [1, 2, 2, 3], "attempt": [0, 0, 1, 1],
        "timestamp": [ts, ts + pd.Timedelta(1, "s"), ts + pd.Timedelta(5, "s"),
                      ts + pd.Timedelta(6, "s")],
        "val_accuracy": [0.1, 0.2, 0.25, 0.3],
    })
    view = canonical_epochs(raw.sample(frac=1, random_state=0))
    assert view["epoch"].tolist() == [1, 2, 3]
    assert view.loc[view["epoch"] == 2, "val_accuracy"].item() == 0.25


def test_store_dedups_re_reported_epochs(tmp_path):
    store = ExperimentStore(str(tmp_path), "e")
    now = datetime.now(UTC)
    row = dict(trial_id="t1", epoch=1, attempt=0, timestamp=now, val_accuracy=0.5)
    store.append_epochs([row, {**row, "epoch": 2, "val_accuracy": 0.6}])
    store.append_epochs([{**row, "epoch": 2, "attempt": 1, "val_accuracy": 0.65}])
    assert len(store.read_epochs(canonical=False)) == 3
    view = store.read_epochs()
    assert view["val_accuracy"].tolist() == [0.5, 0.65]


def test_a_folder_of_experiments_stands_for_all_of_them(two):
    root, _, _ = two
    (root / "plots").mkdir()  # not an experiment: passed over
    out = io.StringIO()
    assert results_main(["leaderboard", str(root), "--by", "searcher", "--format", "csv"],
                        out=out) == 0
    table = pd.read_csv(io.StringIO(out.getvalue()))
    assert sorted(table["searcher"]) == ["optuna", "random"] and table["experiments"].sum() == 2
    # the same experiments named twice, once through the folder: read once
    assert len(lb.load([str(root), str(root / "exp-a")]).experiments) == 2


def test_compare_two_experiments_by_searcher(two):
    root, _, _ = two
    exps = lb.load([str(root / "exp-a"), str(root / "exp-b")])
    table = lb.compare(exps, "searcher")
    assert set(table["searcher"]) == {"random", "optuna"}
    for row in table.itertuples():
        mine = exps.trials[exps.trials["experiment"] == ("exp-a" if row.searcher == "random"
                                                         else "exp-b")]
        assert row.trials == len(mine)
        assert row.best_val_accuracy == pytest.approx(mine["best_val_accuracy"].max(), abs=1e-4)
        assert row.trial_epochs == mine["epochs"].sum()
    both = lb.leaderboard(exps.trials, top=10)
    assert set(both["experiment"]) <= {"exp-a", "exp-b"}


def test_anytime_curve_is_monotone_and_counts_epochs(two):
    root, _, _ = two
    exps = lb.load([str(root / "exp-a"), str(root / "exp-b")])
    curve = lb.anytime(exps.epochs)
    for name, group in curve.groupby("experiment"):
        assert group["best_so_far"].is_monotonic_increasing
        assert group["trial_epochs"].tolist() == list(range(1, len(group) + 1))
        mine = exps.epochs[exps.epochs["experiment"] == name]
        assert group["best_so_far"].iloc[-1] == pytest.approx(mine["val_accuracy"].max())
        assert group["wall_s"].min() >= 0


def test_boundary_flagging(tmp_path):
    # Accuracy peaks at lr=0.1, the top of the range: the best trials sit at the high edge.
    write_synthetic(str(tmp_path), "edge", trials=60, max_epochs=3, seed=0, best_lr=0.2,
                    stopped_fraction=0.0)
    write_synthetic(str(tmp_path), "inside", trials=60, max_epochs=3, seed=0, best_lr=3e-3,
                    stopped_fraction=0.0)
    edge, inside = lb.load([str(tmp_path / "edge")]), lb.load([str(tmp_path / "inside")])
    space = json.loads(edge.experiments["space"].iloc[0])
    assert plots.edge_flags(edge.trials, space) == {"learning_rate": "high"}
    assert "learning_rate" not in plots.edge_flags(inside.trials, space)
    # the best two of the edge experiment alone sit at the edge too, but two say nothing
    two_best = lb.ranked(edge.trials).head(2)
    assert plots.edge_flags(two_best, space, top=2) == {}
    assert plots.edge_flags(lb.ranked(edge.trials).head(3), space) == {"learning_rate": "high"}


def test_each_plot_is_written_with_its_data(two, tmp_path):
    root, _, _ = two
    exps = lb.load([str(root / "exp-a"), str(root / "exp-b")])
    out = tmp_path / "png"
    drawn = plots.learning_curves(exps.epochs, exps.trials, out / "lc.png", top=3)
    best3 = lb.ranked(exps.trials).head(3)
    # both experiments number their trials t00000, ...: each is named by its experiment too
    assert list(drawn) == (best3["experiment"] + "/" + best3["trial_id"]).tolist()
    ranked_a = lb.ranked(exps.trials[exps.trials["experiment"] == "exp-a"])
    one = plots.learning_curves(exps.epochs[exps.epochs["experiment"] == "exp-a"],
                                ranked_a, out / "lc_a.png", top=3)
    assert list(one) == ranked_a.head(3)["trial_id"].tolist()
    for frame in drawn.values():
        assert frame["epoch"].tolist() == list(range(1, len(frame) + 1))
    curve = plots.anytime_curves(exps.epochs, out / "anytime.png")
    assert set(curve["experiment"]) == {"exp-a", "exp-b"}
    mine = exps.trials[exps.trials["experiment"] == "exp-a"]
    axes = plots.hyperparameter_axes(mine, exps.experiments["space"].iloc[0], out / "hp.png")
    assert set(axes["points"]) == {"learning_rate", "dropout", "batch_size"}
    assert len(axes["points"]["dropout"]) == len(mine)
    reached = plots.scheduler_view(mine, 9, out / "sched.png", rungs=[1, 3])
    assert reached.loc[1] == len(mine) and reached.loc[9] == (mine["epochs"] == 9).sum()
    assert reached.is_monotonic_decreasing
    x = np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(10), 5).astype(np.uint8)
    overview = plots.dataset_overview(x, y, tuple("abcdefghij"), out / "data.png")
    assert overview["counts"].tolist() == [5] * 10
    np.testing.assert_allclose(overview["means"][3], x[y == 3].mean(axis=0))
    for name in ("lc", "anytime", "hp", "sched", "data"):
        path = out / f"{name}.png"
        assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_accounting(two):
    root, a, _ = two
    exps = lb.load([str(root / "exp-a")])
    row = exps.experiments.iloc[0].to_dict()
    acct = lb.accounting(row, exps.trials, exps.epochs)
    assert acct["trials"] == 40 and acct["trial_epochs"] == exps.trials["epochs"].sum()
    assert acct["trial_epochs_without_early_stopping"] == 40 * 9
    assert 0 < acct["epochs_saved_fraction"] < 1
    assert acct["core_seconds"] == pytest.approx(exps.trials["train_time_s"].sum())
    assert acct["best_val_accuracy"] == pytest.approx(exps.trials["best_val_accuracy"].max(),
                                                      abs=1e-4)
    assert acct["trial_epochs_rerun"] == 0 and acct["core_seconds_rerun"] == 0
    # Three epochs that ran twice (a retry from an earlier checkpoint, a resume): the runs
    # the canonical view dropped count as compute, not as trial-epochs of the search.
    first = exps.epochs.head(3).assign(attempt=-1, epoch_time_s=2.0)
    trials = exps.trials.assign(cpus=2.0)
    again = lb.accounting(row, trials, exps.epochs, pd.concat([first, exps.epochs]))
    assert again["trial_epochs"] == acct["trial_epochs"] and again["trial_epochs_rerun"] == 3
    assert again["core_seconds_rerun"] == pytest.approx(3 * 2.0 * 2)
    assert again["core_seconds"] == pytest.approx(2 * exps.trials["train_time_s"].sum() + 12,
                                                  abs=0.1)


def test_final_retrains_with_the_precision_the_search_recorded():
    from results.final import config_for

    trial = pd.Series({"trial_id": "t1", "epochs": 2, "params_model": "cnn",
                       "params_learning_rate": 0.01, "precision": "mixed_bfloat16"})
    assert config_for(trial).precision == "mixed_bfloat16"
    assert config_for(trial).epochs == 2 and config_for(trial).learning_rate == 0.01
    # a trial stopped at epoch 2 of the search's 4 keeps its 4-epoch schedule (final stops at 2)
    assert config_for(pd.concat([trial, pd.Series({"params_epochs": 4})])).epochs == 4
    # experiments from before the column, or a trial that never reported an epoch: auto
    assert config_for(trial.drop("precision")).precision == "auto"
    assert config_for(pd.concat([trial.drop("precision"), pd.Series({"precision": np.nan})])
                      ).precision == "auto"
    # a precision the space fixed or searched is a parameter, and wins
    fixed = pd.concat([trial, pd.Series({"params_precision": "float32"})])
    assert config_for(fixed).precision == "float32"
    # unless `final --precision` names one
    assert config_for(trial, "float32").precision == "float32"
    assert config_for(fixed, "mixed_bfloat16").precision == "mixed_bfloat16"
    assert config_for(trial, "auto").precision == "auto"


def test_final_says_when_a_bfloat16_retrain_will_be_emulated(monkeypatch):
    import fmnist.config
    from results.final import config_for, slow_precision_note

    trial = pd.Series({"trial_id": "t1", "epochs": 2, "params_model": "cnn",
                       "precision": "mixed_bfloat16"})
    monkeypatch.setattr(fmnist.config, "bf16_cpu", lambda cpuinfo=None: False)
    assert "--precision float32" in slow_precision_note(config_for(trial))
    assert slow_precision_note(config_for(trial, "float32")) is None
    monkeypatch.setattr(fmnist.config, "bf16_cpu", lambda cpuinfo=None: True)
    assert slow_precision_note(config_for(trial)) is None


def test_a_parameter_one_experiment_lacks_is_a_dash_in_text_and_md():
    table = pd.DataFrame({"trial": ["a", "b"], "units": [512.0, np.nan],
                          "blocks": [np.nan, 3.0]})
    rows = [line.split() for line in lb.format_table(table, "text").splitlines()[1:]]
    assert rows == [["a", "512", "-"], ["b", "-", "3"]]  # pandas wrote NaN here before
    md = lb.format_table(table, "md").splitlines()[2:]
    assert md == ["| a | 512 | - |", "| b | - | 3 |"]
    assert lb.format_table(table, "csv").splitlines()[1:] == ["a,512.0,", "b,,3.0"]


def test_leaderboard_across_experiments_shows_epochs_run_and_each_rows_experiment(tmp_path):
    # Two searches with different max epochs: the searched schedule length (`params_epochs`)
    # varies, and once replaced the `epochs` column (epochs run) in the table
    write_synthetic(str(tmp_path), "long", trials=20, max_epochs=9, seed=1, best_lr=3e-3)
    write_synthetic(str(tmp_path), "short", trials=20, max_epochs=3, seed=2, best_lr=1e-1)
    exps = lb.load([str(tmp_path / "long"), str(tmp_path / "short")])
    board = lb.leaderboard(exps.trials, top=3)
    assert set(board["experiment"]) == {"long"}  # the top rows are all one experiment's
    ran = exps.trials.set_index(["experiment", "trial_id"])["epochs"]
    assert board["epochs"].tolist() == [ran[("long", t)] for t in board["trial"]]
    assert (board["params_epochs"] == 9).all()
    whole = lb.leaderboard(exps.trials, top=40)
    assert set(whole["params_epochs"]) == {9, 3} and whole["epochs"].max() == 9


def test_leaderboard_names_trials_with_epochs_but_no_trial_row(two, capsys):
    # a running trial (or one of a killed search) has epoch rows and no trial row yet
    root, a, _ = two
    ts = pd.Timestamp("2026-01-02", tz="UTC")
    rows = pd.DataFrame({"trial_id": "t-running", "epoch": [1, 2], "attempt": 0,
                         "timestamp": [ts, ts], "val_accuracy": [0.5, 0.61]})
    table = pa.Table.from_pandas(rows.reindex(columns=EPOCH_SCHEMA.names), schema=EPOCH_SCHEMA,
                                 preserve_index=False)
    a.write_table(table, "epochs/part-running.parquet")
    exps = lb.load([str(root / "exp-a")])
    assert lb.without_trial_row(exps.trials, exps.epochs).to_dict("records") == [
        {"experiment": "exp-a", "trial_id": "t-running", "epochs": 2,
         "best_val_accuracy": 0.61}]
    assert results_main(["leaderboard", str(root / "exp-a"), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert "t-running" not in out  # the table is unchanged; the note goes to stderr
    assert err.strip() == ("not ranked: 1 trial(s) with epochs but no trial row yet, still "
                           "running or in a search that was killed (--resume records them): "
                           "t-running (epoch 2, best 0.6100)")
    assert results_main(["leaderboard", str(root / "exp-b")]) == 0
    assert capsys.readouterr().err == ""


def test_a_search_read_before_its_first_trial_row(two, tmp_path, capsys):
    # a search killed (or read) before any epoch ended: its experiment row and nothing else
    root, a, _ = two
    empty = ExperimentStore(str(root), "exp-empty")
    empty.write_experiment(a.read_experiment())
    assert results_main(["leaderboard", str(root / "exp-empty")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1] == "(no trials recorded yet)" and "Empty" not in out
    assert results_main(["plots", str(root / "exp-empty"), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == (f"error: no epochs recorded yet in {root / 'exp-empty'}: "
                                       "nothing to plot (a search records each epoch when it "
                                       "ends)\n")
    assert not (tmp_path / "p").exists()
    # then its first epochs, before any trial row: plotted, and the unranked trial is named
    ts = pd.Timestamp("2026-01-02", tz="UTC")
    rows = pd.DataFrame({"trial_id": "t-running", "epoch": [1], "attempt": 0,
                         "timestamp": [ts], "val_accuracy": [0.5]})
    empty.write_table(pa.Table.from_pandas(rows.reindex(columns=EPOCH_SCHEMA.names),
                                           schema=EPOCH_SCHEMA, preserve_index=False),
                      "epochs/part-running.parquet")
    assert results_main(["plots", str(root / "exp-empty"), "--out", str(tmp_path / "p")]) == 0
    assert "not ranked: 1 trial(s)" in capsys.readouterr().err
    assert (tmp_path / "p" / "learning_curves.png").is_file()
    assert (tmp_path / "p" / "anytime.png").is_file()


def test_cli_leaderboard_formats(two, tmp_path):
    root, _, _ = two
    out = io.StringIO()
    assert results_main(["leaderboard", str(root / "exp-a"), "--top", "3", "--format", "md",
                         "--out", str(tmp_path / "b.md")], out=out) == 0
    md = out.getvalue().splitlines()
    assert md[0].startswith("| rank | trial |") and len(md) == 5
    out = io.StringIO()
    assert results_main(["leaderboard", str(root / "exp-a"), str(root / "exp-b"), "--by",
                         "searcher", "--format", "csv"], out=out) == 0
    frame = pd.read_csv(io.StringIO(out.getvalue()))
    assert set(frame["searcher"]) == {"random", "optuna"}


def test_cli_out_that_cannot_be_written_is_one_line_before_reading(two, tmp_path):
    root, _, _ = two
    (tmp_path / "a_file").write_text("x")
    cases = [(["plots", "--out", str(tmp_path / "a_file" / "plots")], "a_file is a file"),
             (["leaderboard", "--out", str(tmp_path / "a_file" / "b.csv")], "a_file is a file"),
             (["leaderboard", "--out", str(tmp_path)], "is a folder")]
    for argv, match in cases:
        out = subprocess.run([sys.executable, "-m", "results", argv[0], str(root / "exp-a"),
                              *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert lines[0].startswith(f"error: --out {argv[-1]}: ") and match in lines[0], lines
    # A folder that does not exist yet is made, as for plots.
    assert results_main(["leaderboard", str(root / "exp-a"), "--out",
                         str(tmp_path / "new" / "b.csv")], out=io.StringIO()) == 0
    assert (tmp_path / "new" / "b.csv").read_text().strip()


def test_the_same_experiment_named_twice_is_read_once(two):
    root, _, _ = two
    once = lb.load([str(root / "exp-a")])
    twice = lb.load([str(root / "exp-a"), str(root / "exp-a") + "/", str(root / "exp-a")])
    assert len(twice.experiments) == 1 and len(twice.trials) == len(once.trials)
    assert len(twice.epochs) == len(once.epochs)


def test_cli_on_a_folder_that_is_not_an_experiment(tmp_path):
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "experiment.parquet").write_bytes(b"")  # a copy cut short
    (tmp_path / "empty").mkdir()  # (tmp_path holds an experiment: leaderboard reads it)
    for command in ("leaderboard", "final"):
        for path, what in ((tmp_path / "empty", "is not an experiment (no experiment.parquet)"),
                           (tmp_path / "typo", "does not exist"),
                           (tmp_path / "cut", "is damaged (")):
            out = subprocess.run([sys.executable, "-m", "results", command, str(path)],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), out.stderr
            assert what in lines[0], out.stderr


def test_final_with_a_data_dir_lacking_the_files_is_one_line_before_tensorflow(two):
    # in a fresh interpreter, where TensorFlow would print its start-up lines if imported
    root, _, _ = two
    (root / "empty").mkdir()
    for argv, message in (
            (["final", str(root / "exp-a"), "--data-dir", str(root / "empty")],
             "error: data dir {} lacks train-images-idx3-ubyte"),
            (["leaderboard", str(root / "exp-a"), "--top", "0"], "error: --top must be >= 1"),
            (["final", str(root / "exp-a"), "--seeds", "0"], "error: --seeds must be >= 1")):
        out = subprocess.run([sys.executable, "-m", "results", *argv], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2
        assert out.stderr.startswith(message.format(root / "empty")), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (root / "exp-a" / "final").exists()


def test_analysis_and_training_code_never_import_ray():
    code = ("import sys\n"
            "import fmnist.data, fmnist.models, fmnist.train, fmnist.evaluate\n"
            "import results.store, results.leaderboard, results.plots, results.final\n"
            "import results.__main__\n"
            "sys.exit(1 if 'ray' in sys.modules else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, "ray was imported: " + out.stderr[-500:]
