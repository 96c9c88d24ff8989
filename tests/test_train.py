import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import fmnist.train
from fmnist.cli import prepare
from fmnist.data import load_splits
from fmnist.train import LRSchedule, TrainConfig, TrainingRun, train
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny(tiny_data_dir):
    return load_splits(tiny_data_dir, val_size=100, train_size=300)


def _optimizer_state(model):
    return [np.asarray(v) for v in model.optimizer.variables]


def test_training_learns_and_reports_every_epoch(tiny):
    seen = []
    cfg = TrainConfig(model="cnn", epochs=3, batch_size=32, base_filters=8, dense_units=16)
    run = train(cfg, tiny, on_epoch_end=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3] and run.epoch == 3
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s",
                "train_samples_per_s"):
        assert all(np.isfinite(m[key]) for m in seen), key
    assert seen[-1]["val_accuracy"] > 0.5  # the synthetic classes are easy


def test_callback_can_stop_training(tiny):
    seen = []
    run = train(TrainConfig(model="mlp", epochs=5, units=8), tiny,
                on_epoch_end=lambda m: seen.append(m) or m["epoch"] < 2)
    assert run.epoch == 2 and len(seen) == 2


def test_checkpoint_restore_continues_identically(tiny, tmp_path):
    cfg = TrainConfig(model="cnn", epochs=3, batch_size=64, base_filters=4, dense_units=8,
                      dropout=0.0, optimizer="sgd", lr_schedule="cosine", learning_rate=0.05)
    a = TrainingRun(cfg, tiny)
    a.fit_epoch()
    a.save(tmp_path / "ckpt")
    b = TrainingRun(cfg, tiny)
    b.restore(tmp_path / "ckpt")
    assert b.epoch == 1 and b.attempt == 1
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    sa, sb = _optimizer_state(a.model), _optimizer_state(b.model)
    assert len(sa) == len(sb) and int(sb[0]) == a.steps_per_epoch  # iterations restored
    for va, vb in zip(sa, sb, strict=True):
        np.testing.assert_array_equal(va, vb)
    assert math.isclose(a.current_lr(), b.current_lr(), rel_tol=1e-6)
    ma, mb = a.fit_epoch(), b.fit_epoch()
    assert ma["epoch"] == mb["epoch"] == 2
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    assert math.isclose(ma["val_loss"], mb["val_loss"], rel_tol=1e-4)


def test_a_restored_run_goes_on_with_its_random_streams_not_from_their_start(tiny, tmp_path):
    # Dropout and augmentation draw from seeded streams that model.keras does not hold: the
    # checkpoint carries them, so one epoch after a restore equals one more epoch straight on.
    cfg = TrainConfig(model="cnn", epochs=3, batch_size=64, base_filters=4, dense_units=8,
                      dropout=0.4, augment_flip=True, augment_translate=0.1)
    a = TrainingRun(cfg, tiny)
    a.fit_epoch()
    a.save(tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    drawn = [s[1] for s in state["seed_states"]]
    assert len(drawn) == 5 and all(n > 0 for n in drawn)  # flip, shift, 3 dropout layers
    b = TrainingRun(cfg, tiny, checkpoint=tmp_path / "ckpt")
    assert b.epoch == 1 and b.attempt == 1
    ma, mb = a.fit_epoch(), b.fit_epoch()
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    assert math.isclose(ma["val_loss"], mb["val_loss"], rel_tol=1e-5)
    # A checkpoint from before the streams were saved still restores (they start anew).
    del state["seed_states"]
    (tmp_path / "ckpt" / "state.json").write_text(json.dumps(state))
    old = TrainingRun(cfg, tiny, checkpoint=tmp_path / "ckpt")
    assert old.epoch == 1 and old.fit_epoch()["epoch"] == 2


def _count_traces(run):
    """Count how often TensorFlow traces the run's train step (Python runs it only then)."""
    calls = []
    step = run.model.train_step
    run.model.train_step = lambda batch: calls.append(1) or step(batch)
    return calls


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_first_epoch_traces_the_train_step_once_new_or_restored(tiny, tmp_path, smoothing):
    cfg = TrainConfig(model="cnn", epochs=3, batch_size=64, base_filters=4, dense_units=8,
                      label_smoothing=smoothing)
    run = TrainingRun(cfg, tiny)
    assert run.model.optimizer.built  # variables exist before any traced step
    calls = _count_traces(run)
    run.fit_epoch()
    run.fit_epoch()
    assert len(calls) == 1  # Keras' default on TensorFlow traces twice in the first epoch
    run.save(tmp_path / "c")
    run.restore(tmp_path / "c")
    calls = _count_traces(run)
    run.fit_epoch()
    assert len(calls) == 1 and run.epoch == 3


def test_building_state_up_front_trains_the_same_weights(tiny, monkeypatch):
    cfg = TrainConfig(model="cnn", epochs=2, batch_size=64, base_filters=4, dense_units=8,
                      dropout=0.2, augment_flip=True)
    a = TrainingRun(cfg, tiny)
    ma = a.fit_epoch()
    monkeypatch.setattr(TrainingRun, "_build_state", lambda self: None)  # Keras' default
    b = TrainingRun(cfg, tiny)
    assert not b.model.optimizer.built
    mb = b.fit_epoch()
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    assert math.isclose(ma["val_loss"], mb["val_loss"], rel_tol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_batches_fed_without_autotuning_train_the_same_weights(tiny, monkeypatch, smoothing):
    # 300 / 64 and 100 / 64 leave a short last batch in training and in validation
    cfg = TrainConfig(model="cnn", epochs=2, batch_size=64, eval_batch_size=64, base_filters=4,
                      dense_units=8, dropout=0.2, augment_flip=True, label_smoothing=smoothing)
    a = TrainingRun(cfg, tiny)
    fed = fmnist.train.feed(a.x_train, a.y_train, 64)["x"]
    assert fed.options().autotune.enabled is False  # no autotuner thread for fit to wait on
    assert [len(x) for x, _ in fed] == [64, 64, 64, 64, 44]
    ma = [a.fit_epoch(), a.fit_epoch()]
    monkeypatch.setattr(fmnist.train, "feed", fmnist.train.keras_feed)  # Keras' own pipeline
    b = TrainingRun(cfg, tiny)
    mb = [b.fit_epoch(), b.fit_epoch()]
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    for ea, eb in zip(ma, mb, strict=True):
        assert math.isclose(ea["val_loss"], eb["val_loss"], rel_tol=1e-5)
        assert ea["val_accuracy"] == eb["val_accuracy"]


def test_bf16_cpu_reads_the_flags_line():
    head = "processor\t: 0\nmodel name\t: x\n"
    assert fmnist.train.bf16_cpu(head + "flags\t\t: fpu avx2 avx512f avx512_bf16 fma\n")
    assert fmnist.train.bf16_cpu(head + "flags\t\t: fpu avx2 amx_tile amx_bf16\n")
    assert not fmnist.train.bf16_cpu(head + "flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    # aarch64 lists "Features", and a bf16 word in another line is not a flag
    assert not fmnist.train.bf16_cpu("Features\t: fp asimd bf16\nmodel name\t: avx512_bf16\n")
    assert not fmnist.train.bf16_cpu("")


def test_auto_precision_is_bfloat16_only_on_a_bf16_cpu_with_onednn(monkeypatch):
    resolve = fmnist.train.resolve_precision
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.setattr(fmnist.train, "gpus_visible", lambda: False)  # as on CI, even on a GPU box
    monkeypatch.setattr(fmnist.train, "bf16_cpu", lambda cpuinfo=None: True)
    assert resolve("auto") == "mixed_bfloat16"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # bfloat16 kernels come from oneDNN
    assert resolve("auto") == "float32"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    assert resolve("auto") == "mixed_bfloat16"
    monkeypatch.setattr(fmnist.train, "gpus_visible", lambda: True)  # GPUs: not measured, float32
    assert resolve("auto") == "float32"
    monkeypatch.setattr(fmnist.train, "gpus_visible", lambda: False)
    monkeypatch.setattr(fmnist.train, "bf16_cpu", lambda cpuinfo=None: False)
    assert resolve("auto") == "float32"
    assert resolve("mixed_bfloat16") == "mixed_bfloat16" and resolve("float32") == "float32"


def test_keras_backend_is_found_as_keras_finds_it(tmp_path):
    from fmnist.config import keras_backend

    home = {"KERAS_HOME": str(tmp_path)}
    assert keras_backend(home) == "tensorflow"  # no keras.json
    (tmp_path / "keras.json").write_text('{"floatx": "float32", "backend": "jax"}')
    assert keras_backend(home) == "jax"
    assert keras_backend({**home, "KERAS_BACKEND": ""}) == "jax"  # empty: Keras ignores it too
    assert keras_backend({**home, "KERAS_BACKEND": "tensorflow"}) == "tensorflow"
    (tmp_path / "keras.json").write_text("{not json")
    assert keras_backend(home) == "tensorflow"
    # Keras itself, pointed at the same file, loads the backend it names (or fails on its import)
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", "import keras; print(keras.backend.backend())"],
                         env={**env, **home}, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "jax" or "No module named 'jax'" in out.stderr, out.stderr


def test_a_backend_keras_cannot_train_with_is_one_line_in_each_cli(tiny_data_dir, tmp_path):
    from fmnist.config import keras_backend_problem

    assert keras_backend_problem({"KERAS_BACKEND": "tensorflow"}) is None
    (tmp_path / "keras.json").write_text('{"backend": "openvino"}')  # says where it came from
    assert keras_backend_problem({"KERAS_HOME": str(tmp_path)}) == (
        f"Keras backend 'openvino' (from {tmp_path / 'keras.json'}) cannot train models here; "
        "use one of tensorflow, jax, torch")
    want = ("error: Keras backend 'numpy' (from KERAS_BACKEND) cannot train models here; use one "
            "of tensorflow, jax, torch")
    for argv in (["fmnist.train", "--data-dir", str(tiny_data_dir), "--model", "mlp"],
                 ["results", "final", str(tmp_path)]):
        out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "KERAS_BACKEND": "numpy"})
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [want], out.stderr


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_precision_sets_the_layers_and_survives_a_restore(tiny, tmp_path, precision):
    compute = {"float32": "float32", "mixed_bfloat16": "bfloat16"}[precision]
    cfg = TrainConfig(model="cnn", epochs=3, batch_size=32, base_filters=8, dense_units=16,
                      precision=precision)
    run = TrainingRun(cfg, tiny)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
    conv = run.model.get_layer("block0_conv")
    assert conv.compute_dtype == compute and conv.kernel.dtype == "float32"
    assert run.model.get_layer("classes").compute_dtype == "float32"
    seen = [run.fit_epoch(), run.fit_epoch()]
    assert [m["precision"] for m in seen] == [precision] * 2
    # Learns in either precision: chance is 0.1; two epochs gave 0.5-0.92 over seeds 0-5 here.
    assert seen[-1]["val_accuracy"] > 0.3
    probs = np.asarray(run.model.predict(tiny.x_val[:8], verbose=0))
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    run.save(tmp_path / "ckpt")
    # restored into a run configured the other way: the checkpoint's precision wins
    other = cfg.replace(precision="float32" if precision != "float32" else "mixed_bfloat16")
    again = TrainingRun(other, tiny)
    again.restore(tmp_path / "ckpt")
    assert again.precision == precision
    assert again.model.get_layer("block0_conv").compute_dtype == compute
    assert again.fit_epoch()["precision"] == precision


def test_train_resumes_from_checkpoint_dir(tiny, tmp_path):
    cfg = TrainConfig(model="mlp", epochs=3, units=8)
    first = []
    train(cfg, tiny, on_epoch_end=lambda m: first.append(m) or m["epoch"] < 2,
          checkpoint_dir=tmp_path / "c")
    rest = []
    train(cfg, tiny, on_epoch_end=rest.append, resume_from=tmp_path / "c")
    assert [m["epoch"] for m in first + rest] == [1, 2, 3]
    # another model than the checkpoint's would be half applied: refused, as by the CLI
    with pytest.raises(fmnist.train.ConfigError, match=r"--units 16 \(the checkpoint's: 8\)"):
        train(cfg.replace(units=16, epochs=4), tiny, resume_from=tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["model.keras", "state.json"]


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(tiny, tmp_path):
    run = TrainingRun(TrainConfig(model="mlp", epochs=3, units=8), tiny)
    run.fit_epoch()
    run.save(tmp_path / "c")
    run.fit_epoch()
    (tmp_path / "c" / ".model.tmp.keras").mkdir()  # the next model file cannot be written
    with pytest.raises(OSError):
        run.save(tmp_path / "c")
    again = TrainingRun(TrainConfig(model="mlp", epochs=3, units=8), tiny)
    again.restore(tmp_path / "c")  # the epoch-1 checkpoint, whole
    assert again.epoch == 1 and again.fit_epoch()["epoch"] == 2


def test_checkpoint_with_lambda_layer_is_refused(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "evil.keras")
    with pytest.raises(ValueError, match="(?i)lambda|unsafe"):
        keras.saving.load_model(tmp_path / "evil.keras", safe_mode=True)


def test_lr_schedules():
    cos = LRSchedule(0.1, "cosine", total_steps=100, warmup_steps=10)
    assert math.isclose(float(cos(0)), 0.01, rel_tol=1e-5)  # warmup from base/warmup
    assert math.isclose(float(cos(10)), 0.1, rel_tol=1e-5)
    assert math.isclose(float(cos(55)), 0.05, rel_tol=1e-4)
    assert float(cos(100)) < 1e-6
    step = LRSchedule(0.1, "step", total_steps=100, step_every=30, gamma=0.1)
    assert [round(float(step(s)), 6) for s in (0, 29, 30, 60)] == [0.1, 0.1, 0.01, 0.001]
    assert float(LRSchedule(0.1, "constant", 100)(77)) == pytest.approx(0.1)


def test_adamw_uses_decoupled_decay_not_l2():
    run_cfg = TrainConfig(model="mlp", optimizer="adamw", weight_decay=0.01)
    model = TrainingRun(run_cfg, {"x_train": np.zeros((4, 28, 28), np.uint8),
                                  "y_train": np.zeros(4, np.uint8),
                                  "x_val": np.zeros((2, 28, 28), np.uint8),
                                  "y_val": np.zeros(2, np.uint8)}).model
    assert model.optimizer.weight_decay == pytest.approx(0.01)
    assert all(getattr(layer, "kernel_regularizer", None) is None for layer in model.layers)


def test_test_split_is_refused_by_training():
    arrays = {k: np.zeros((2, 28, 28) if k.startswith("x") else 2, np.uint8)
              for k in ("x_train", "y_train", "x_val", "y_val", "x_test")}
    with pytest.raises(ValueError, match="exactly x_train, y_train, x_val, y_val"):
        TrainingRun(TrainConfig(), arrays)


def test_cli_trains_and_saves(tiny_data_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fmnist.train", "--data-dir", str(tiny_data_dir), "--model", "mlp",
         "--units", "16", "--epochs", "2", "--val-size", "100", "--train-size", "200",
         "--learning-rate", "2e-3", "--save", str(tmp_path / "m")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "adam lr 0.002\n" in out.stdout  # 2e-3 is a number, not YAML 1.1's string
    lines = [line for line in out.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "val_acc" in lines[0]
    assert (tmp_path / "m" / "model.keras").is_file()
    assert "\nparams 13,002," in out.stdout  # 784*16+16, 16*16+16, 16*10+10
    # TensorFlow 2.21's start-up lines, which TF_CPP_MIN_LOG_LEVEL no longer reaches: filtered
    assert out.stderr == "", out.stderr[-2000:]
    # --resume takes the checkpoint's config: --epochs alone trains the third epoch of that mlp
    out = subprocess.run(
        [sys.executable, "-m", "fmnist.train", "--data-dir", str(tiny_data_dir), "--epochs", "3",
         "--val-size", "100", "--train-size", "200", "--resume", str(tmp_path / "m")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("mlp: train 200, val 100, 3 epochs, batch 128, adam lr 0.002")
    lines = [line for line in out.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 1 and lines[0].startswith("epoch   3 ")
    assert "\nparams 13,002," in out.stdout  # the same 16-unit mlp, not the default 256


def test_sigterm_stops_training_as_ctrl_c_does_and_its_checkpoint_resumes(
        tiny_data_dir, tmp_path, sigterm_not_ignored):
    # `kill`, `docker stop`, Slurm's time limit: before, SIGTERM ended the process at once,
    # without the --resume line or Keras' end of the epoch
    save = tmp_path / "m"
    argv = [sys.executable, "-m", "fmnist.train", "--data-dir", str(tiny_data_dir), "--model",
            "mlp", "--units", "8", "--epochs", "1000", "--val-size", "100", "--train-size",
            "200", "--save", str(save)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not (save / "state.json").exists() and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err == f"interrupted; --resume {save} continues from its last checkpoint\n"
    trained = [line for line in out.splitlines() if line.startswith("epoch")]
    last = json.loads((save / "state.json").read_text())["epoch"]
    assert 1 <= last <= len(trained) < 1000
    out = subprocess.run(
        [sys.executable, "-m", "fmnist.train", "--data-dir", str(tiny_data_dir), "--epochs",
         str(last + 1), "--val-size", "100", "--train-size", "200", "--resume", str(save)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 1 and lines[0].startswith(f"epoch {last + 1:3d} ")


def test_sigterm_as_ctrl_c_raises_keyboard_interrupt_inside_and_puts_the_handler_back():
    from fmnist.cli import sigterm_as_ctrl_c

    def mine(signum, frame):
        raise AssertionError("the handler before is not called inside")

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once; this is never reached
        assert signal.getsignal(signal.SIGTERM) is mine
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored (nohup-like): left ignored
        with sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def _checkpoint(folder, epoch, **config):
    folder.mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "attempt": 0, "config": TrainConfig(**config).to_dict()}
    (folder / "state.json").write_text(json.dumps(state))
    return str(folder)


def test_start_up_lines_are_hidden_as_tf_cpp_min_log_level_says():
    from fmnist.startup import hidden

    banner = (b"WARNING: All log messages before absl::InitializeLog() is called are written to "
              b"STDERR\n")
    info = b"I0000 00:00:1795541036.807738   31836 port.cc:153] oneDNN custom operations are on.\n"
    cuinit = (b"E0000 00:00:1795541039.170818   31836 cuda_platform.cc:52] failed call to cuInit: "
              b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    error = b"E0000 00:00:1795541039.170818   31836 gpu_device.cc:99] Cannot dlopen libcudnn\n"
    ours = [b"Traceback (most recent call last):\n", b"UserWarning: I0000 is not a log line\n"]
    for level, shown in ((0, [banner, info, cuinit, error]), (1, [cuinit, error]), (2, [error]),
                         (3, [])):
        kept = [line for line in (banner, info, cuinit, error, *ours) if not hidden(line, level)]
        assert kept == [*shown, *ours], level


def test_resume_keeps_the_checkpoints_config_and_refuses_what_would_not_train(tmp_path):
    from fmnist.data import DataError
    from fmnist.train import ConfigError, resumed_config

    flat = _checkpoint(tmp_path / "flat", 2, model="mlp", units=16, epochs=2)
    cfg = resumed_config(flat, {"epochs": 5})
    assert (cfg.model, cfg.units, cfg.epochs) == ("mlp", 16, 5)  # a constant rate goes on
    assert resumed_config(flat, {"epochs": 3, "model": "mlp", "units": 16}).epochs == 3
    with pytest.raises(ConfigError, match=r"--units 32 \(the checkpoint's: 16\): a resumed run "
                                          r"may change only --epochs, --eval-batch-size"):
        resumed_config(flat, {"epochs": 3, "units": 32})
    with pytest.raises(ConfigError, match=r"--jit-compile True \(the checkpoint's: False\)"):
        resumed_config(flat, {"epochs": 3, "jit_compile": True})  # its step is compiled as saved
    cfg = resumed_config(flat, {"epochs": 3, "intra_op_threads": 1, "eval_batch_size": 64})
    assert (cfg.intra_op_threads, cfg.eval_batch_size, cfg.units) == (1, 64, 16)
    with pytest.raises(ConfigError, match=r"has run 2 epochs; --epochs 2 leaves none"):
        resumed_config(flat, {})
    cosine = _checkpoint(tmp_path / "cos", 1, model="mlp", epochs=4, lr_schedule="cosine")
    assert resumed_config(cosine, {}).epochs == 4  # finishes its schedule
    with pytest.raises(ConfigError, match=r"--epochs 6 goes past the 4 epochs its cosine"):
        resumed_config(cosine, {"epochs": 6})
    done = _checkpoint(tmp_path / "done", 4, model="mlp", epochs=4, lr_schedule="cosine")
    with pytest.raises(ConfigError, match=r"ran all 4 epochs of its cosine schedule"):
        resumed_config(done, {"epochs": 8})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.json").write_text("{not json")
    with pytest.raises(DataError, match=r"state.json is not a checkpoint's"):
        resumed_config(str(tmp_path / "bad"), {"epochs": 3})


@pytest.mark.parametrize("flags, message", [
    (["--model", "gpt"], "model must be one of mlp, cnn, vgg, resnet"),
    (["--save", "{file}/m"], "--save {file}/m: {file} is a file, not a folder"),
    (["--resume", "{tmp}"], "--resume {tmp}: not a checkpoint folder (no state.json; "
                            "--save writes one)"),
    (["--seed", "-1"], "seed must be between 0 and 4294967295"),
    (["--precision", "half"], "precision must be one of auto, float32, mixed_bfloat16"),
    (["--model", "cnn", "--blocks", "5"], "blocks must be between 1 and 4 for 28x28 inputs, got 5"),
    (["--kernel-size", "5"], "--kernel-size: model mlp does not read it (kernel_size is for model "
                             "cnn); leave it out"),
    (["--momentum", "0.5"], "--momentum: optimizer adam does not read it (momentum is for "
                            "optimizer sgd); leave it out"),
    (["--data-dir", "{tmp}/none"], "data dir {tmp}/none does not exist"),
])
def test_cli_bad_input_is_one_line_before_training(tiny_data_dir, tmp_path, flags, message):
    (tmp_path / "a_file").write_text("x")
    subst = {"{file}": str(tmp_path / "a_file"), "{tmp}": str(tmp_path)}
    for key, value in subst.items():
        flags = [f.replace(key, value) for f in flags]
        message = message.replace(key, value)
    out = subprocess.run(
        [sys.executable, "-m", "fmnist.train", "--data-dir", str(tiny_data_dir), "--model", "mlp",
         "--units", "8", "--epochs", "1", "--val-size", "100", "--train-size", "200", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "epoch " not in out.stdout  # nothing trained
    # checked before Keras is imported, so TensorFlow's start-up lines do not come first
    assert out.stderr.strip().splitlines() == [f"error: {message}"], out.stderr[-2000:]


def test_a_dropout_vgg_would_not_read_is_refused_and_one_it_reads_is_taken(tiny_data_dir,
                                                                           capsys):
    # vgg's only dropout is in its dense layer, which --dense-units 0 leaves out
    base = ["--data-dir", str(tiny_data_dir), "--train-size", "200", "--val-size", "100",
            "--model", "vgg", "--dropout", "0.3"]
    assert prepare([*base, "--dense-units", "0"]) == 2
    assert capsys.readouterr().err == (
        "error: --dropout: model vgg with dense_units 0 does not read it (vgg's dropout is in "
        "its dense layer, which dense_units 0 leaves out); leave it out\n")
    prepared = prepare([*base, "--dense-units", "16"])
    assert prepared.cfg.dropout == 0.3 and prepared.cfg.dense_units == 16
    assert prepare([*base, "--dense-units", "0", "--model", "resnet"]) == 2  # resnet: dense
    assert "--dense-units: model resnet does not read it" in capsys.readouterr().err


def test_the_installed_fmnist_train_command_checks_flags_before_keras(tiny_data_dir, tmp_path):
    # pyproject's console script: the same checks as `python -m fmnist.train`, before the
    # Keras import (it imported fmnist.train, and with it Keras, first: 3 s and TensorFlow's
    # start-up lines before the error).
    command = Path(sys.executable).parent / "fmnist-train"
    assert command.is_file(), f"{command} missing: install the project (make test does)"
    out = subprocess.run([str(command), "--data-dir", str(tiny_data_dir), "--model", "gpt"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: model must be one of mlp, cnn, vgg, resnet"], out.stderr[-2000:]
    usage = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: fmnist-train ")
