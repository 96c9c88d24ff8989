"""Cluster configs checked against Ray's own schema; a real multi-node search on this machine."""

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from results.store import ExperimentStore
from search.trainable import gpu_memory_settings
from tests.conftest import REPO, driver_cmd, driver_env, search_args

CLUSTERS = REPO / "clusters"
LAUNCHER = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY = sorted((CLUSTERS / "kuberay").glob("*.yaml"))


def launcher_schema() -> dict:
    # The schema the installed Ray ships for its cluster launcher, not a copy of ours.
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_problems(config: dict) -> list[str]:
    problems = []
    text = json.dumps(config)
    if "0.0.0.0" in text:
        problems.append("something binds 0.0.0.0")
    head = " ".join(config.get("head_start_ray_commands", []))
    if "--dashboard-host=127.0.0.1" not in head:
        problems.append("dashboard not bound to 127.0.0.1")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if "ray start" in c]
        if not starts or not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{key}: token auth missing")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("the token is not copied to the nodes")
    return problems


def _containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def kuberay_problems(doc: dict) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion must be ray.io/v1")
    if doc.get("kind") == "RayJob":
        if "search/run.py" not in doc["spec"].get("entrypoint", ""):
            problems.append("the RayJob does not run search/run.py")
        if doc["spec"].get("submissionMode") != "SidecarMode":
            problems.append("a loopback dashboard needs the sidecar submitter")
        spec = doc["spec"].get("rayClusterSpec", {})
    elif doc.get("kind") == "RayCluster":
        spec = doc.get("spec", {})
    else:
        return [f"unexpected kind {doc.get('kind')!r}"]
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("token auth missing (authOptions.mode)")
    version = tuple(int(p) for p in str(spec.get("rayVersion", "0")).split(".")[:2])
    if version < (2, 52):
        problems.append("rayVersion must be >= 2.52 for token auth")
    head = spec.get("headGroupSpec", {})
    if head.get("rayStartParams", {}).get("dashboard-host") != "127.0.0.1":
        problems.append("dashboard not bound to 127.0.0.1")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append("head service exposed outside the cluster")
    if "0.0.0.0" in json.dumps(doc):
        problems.append("something binds 0.0.0.0")
    try:
        assert _containers(head)[0]["image"]
        groups = spec["workerGroupSpecs"]
        assert groups and all("nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]
                              for g in groups)
        assert all(g["minReplicas"] <= g["maxReplicas"] for g in groups)
    except (KeyError, IndexError, TypeError, AssertionError):
        problems.append("head/worker groups incomplete or without GPUs")
    return problems


def test_there_are_configs():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_valid_and_safe(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, launcher_schema())
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for n, t in config["available_node_types"].items()
               if n != config["head_node_type"]]
    assert len(workers) >= 2 and all(t["max_workers"] >= 1 for t in workers)
    assert launcher_problems(config) == []


def test_launcher_checks_can_fail():
    config = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    exposed = copy.deepcopy(config)
    exposed["head_start_ray_commands"] = [
        c.replace("127.0.0.1", "0.0.0.0") for c in exposed["head_start_ray_commands"]]
    assert "dashboard not bound to 127.0.0.1" in launcher_problems(exposed)
    open_cluster = copy.deepcopy(config)
    open_cluster["worker_start_ray_commands"] = ["ray start --address=$RAY_HEAD_IP:6379"]
    assert any("token auth missing" in p for p in launcher_problems(open_cluster))
    broken = copy.deepcopy(config)
    broken["provider"] = {"region": "us-west-2"}  # no type
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, launcher_schema())


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_is_complete_and_safe(path):
    doc = yaml.safe_load(path.read_text())
    assert kuberay_problems(doc) == []


def test_kuberay_checks_can_fail():
    doc = yaml.safe_load((CLUSTERS / "kuberay" / "raycluster.yaml").read_text())
    no_auth = copy.deepcopy(doc)
    del no_auth["spec"]["authOptions"]
    assert "token auth missing (authOptions.mode)" in kuberay_problems(no_auth)
    exposed = copy.deepcopy(doc)
    exposed["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    assert "dashboard not bound to 127.0.0.1" in kuberay_problems(exposed)
    cpu_only = copy.deepcopy(doc)
    del cpu_only["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"]
    assert "head/worker groups incomplete or without GPUs" in kuberay_problems(cpu_only)


@pytest.mark.parametrize(
    "fraction,total,expected",
    [(0.0, 80_000, {"memory_growth": False, "memory_limit_mib": None}),
     (1.0, 80_000, {"memory_growth": True, "memory_limit_mib": None}),
     (2.0, 80_000, {"memory_growth": True, "memory_limit_mib": None}),
     (0.5, 80_000, {"memory_growth": False, "memory_limit_mib": 36_000}),
     (0.25, 81_559, {"memory_growth": False, "memory_limit_mib": 18_350})],
)
def test_gpu_packing_settings(fraction, total, expected):
    assert gpu_memory_settings(fraction, total) == expected


def test_four_quarter_gpu_trials_fit_on_one_gpu():
    total = 81_559  # an H100's MiB
    limits = [gpu_memory_settings(0.25, total)["memory_limit_mib"] for _ in range(4)]
    assert sum(limits) < total and min(limits) > 0.2 * total


# Each trial's first epoch waits (the driver's "meet" mode) until trials have started on two
# nodes. Tiny trials end in about a second, and Tune hands the next trial to the actor that is
# free rather than wait for one still starting (importing TensorFlow) on the other node: without
# the wait a slow start there leaves every trial on one node.
def test_search_on_a_multi_node_cluster(tiny_data_dir, tiny_space, tmp_path):
    from ray.cluster_utils import Cluster

    # A head that runs no trials and two one-CPU worker nodes, all real Ray processes.
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        cluster.wait_for_nodes()
        argv = search_args(tiny_data_dir, tiny_space, tmp_path, "multi", "--num-samples", "4",
                           "--max-epochs", "2", "--scheduler", "fifo", "--address",
                           cluster.address)
        out = subprocess.run(driver_cmd(tmp_path, "meet", argv), cwd=REPO,
                             capture_output=True, text=True, timeout=400, env=driver_env())
        assert out.returncode == 0, out.stderr[-3000:]
        epochs = ExperimentStore(str(tmp_path), "multi").read_epochs()
        worker_ids = {n.node_id for n in nodes}
        assert set(epochs["node"]) <= worker_ids  # never on the zero-CPU head
        assert epochs["node"].nunique() == 2  # trials ran on both worker nodes
        assert {p.name for p in (tmp_path / "driver-files").iterdir()} == worker_ids
        assert len(epochs) == 8
        assert cluster.address in out.stdout  # the plan names the cluster it ran on

        # A node whose GPU Keras cannot see (Ray's GPU here is a number: there is no CUDA):
        # trials given it would train on the CPU, so the search stops before it starts.
        if shutil.which("nvidia-smi") is None:  # on a GPU box Ray's GPU 0 would be a real one
            cluster.add_node(num_cpus=0, num_gpus=1)
            cluster.wait_for_nodes()
            argv = search_args(tiny_data_dir, tiny_space, tmp_path, "gpu", "--address",
                               cluster.address, "--gpus-per-trial", "1")
            out = subprocess.run([sys.executable, "search/run.py", *argv], cwd=REPO,
                                 capture_output=True, text=True, timeout=300, env=driver_env())
            assert out.returncode == 2, out.stderr[-3000:]
            assert out.stderr.strip().splitlines()[-1].startswith(
                "error: --gpus-per-trial 1: Ray gave GPU 0 on "), out.stderr[-3000:]
            assert "Keras' tensorflow backend sees no GPU there, so trials would train on the " \
                "CPU; install the GPU build on every node (pip install -e '.[gpu]'" in out.stderr
            assert "Traceback" not in out.stderr
            assert not (tmp_path / "gpu").exists()  # nothing written
    finally:
        cluster.shutdown()


def test_bad_address_is_refused(tiny_data_dir, tiny_space, tmp_path):
    argv = search_args(tiny_data_dir, tiny_space, tmp_path, "addr", "--address", "http://x")
    out = subprocess.run([sys.executable, "search/run.py", *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--address 'http://x'" in out.stderr


def test_address_nobody_answers_on_is_refused_at_once(tiny_data_dir, tiny_space, tmp_path):
    # ray.init would retry such an address for many minutes; a closed port must fail in seconds.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    storage = tmp_path / "runs"
    argv = search_args(tiny_data_dir, tiny_space, storage, "dead", "--address", f"127.0.0.1:{port}")
    out = subprocess.run([sys.executable, "search/run.py", *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"--address 127.0.0.1:{port}: cannot reach 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    assert not storage.exists()  # nothing written


def test_address_auto_without_a_cluster_is_one_line(no_ray_running, tiny_data_dir, tiny_space,
                                                     tmp_path):
    # An empty temp dir has no address file, and no_ray_running leaves no GCS process to find.
    storage = tmp_path / "runs"
    argv = search_args(tiny_data_dir, tiny_space, storage, "auto", "--address", "auto")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "raytmp")}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "search/run.py", *argv], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: --address auto: " in out.stderr
    assert "Traceback" not in out.stderr
    assert not storage.exists()  # nothing written


def test_local_storage_on_several_machines_is_refused():
    from search.run import storage_problem

    two = {"10.0.0.1", "10.0.0.2"}
    assert "spans 2 machines" in storage_problem(two, "runs", shared=False)
    assert storage_problem(two, "runs", shared=True) is None  # the user says it is NFS
    assert storage_problem(two, "s3://bucket/runs", shared=False) is None
    assert storage_problem({"127.0.0.1"}, "runs", shared=False) is None  # one machine
