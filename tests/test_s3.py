"""A search and its final evaluation with `--storage s3://...`, against a real S3 server.

moto's server (an S3 implementation in Python, a test extra) runs in this process on a free
loopback port; pyarrow, Ray Tune and the search's workers reach it through AWS_ENDPOINT_URL,
as they would reach AWS itself or any S3-compatible store.
"""

import io
import os

import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from results.__main__ import main as results_main
from results.store import ExperimentStore
from tests.conftest import run_cli, search_args

BUCKET = "fmnist-test"


@pytest.fixture(scope="module")
def s3_env():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    admin = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                              access_key="test", secret_key="test", region="us-east-1",
                              allow_bucket_creation=True)
    admin.create_dir(BUCKET)
    yield env
    server.stop()


def _files(folder_uri: str) -> set[str]:
    fs, path = pafs.FileSystem.from_uri(folder_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return {i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_a_search_and_its_final_evaluation_live_in_the_bucket(s3_env, tiny_data_dir, tiny_space,
                                                              tmp_path, monkeypatch):
    root = f"s3://{BUCKET}/runs"
    out = run_cli(*search_args(tiny_data_dir, tiny_space, root, "b", "--num-samples", "2",
                                "--max-epochs", "2", "--scheduler", "fifo"),
                   env={**os.environ, **s3_env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"results: {root}/b" in out.stdout
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # nothing may land where the analysis runs

    store = ExperimentStore(root, "b")
    trials, epochs = store.read_trials(), store.read_epochs()
    assert sorted(trials["status"]) == ["completed", "completed"]
    assert sorted(epochs.groupby("trial_id")["epoch"].apply(list)) == [[1, 2], [1, 2]]
    assert store.has_ray_state()  # Tune's state is in the bucket too, for --resume

    board = io.StringIO()
    assert results_main(["leaderboard", f"{root}/b", "--format", "csv"], out=board) == 0
    assert len(board.getvalue().splitlines()) == 3

    text = io.StringIO()
    assert results_main(["final", f"{root}/b", "--seeds", "1"], out=text) == 0
    made = {"final.parquet", "per_class.parquet", "model.keras", "report.md",
            "confusion_matrix.png", "misclassified.png", "learning_curves.png", "anytime.png",
            "hyperparameters.png", "scheduler.png", "dataset.png"}
    assert _files(f"{root}/b/final") == made
    assert f"report: {root}/b/final/report.md" in text.getvalue()
    assert list(tmp_path.iterdir()) == []  # before, the report and plots were written here

    fs, path = pafs.FileSystem.from_uri(f"{root}/b/final/model.keras")
    local = tmp_path.parent / f"{tmp_path.name}-model.keras"
    with fs.open_input_stream(path) as src:
        local.write_bytes(src.read())
    import keras

    assert keras.saving.load_model(local, safe_mode=True).output_shape == (None, 10)

    # A second evaluation keeps the first: it goes beside it and says so.
    again = io.StringIO()
    assert results_main(["final", f"{root}/b", "--seeds", "1"], out=again) == 0
    assert "this one goes to final-2/" in again.getvalue()
    assert _files(f"{root}/b/final-2") == made and _files(f"{root}/b/final") == made
    with fs.open_input_stream(f"{BUCKET}/runs/b/final-2/report.md") as src:
        assert "This is evaluation 2 of this experiment on the test set" in src.read().decode()
