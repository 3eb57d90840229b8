"""GPU check: train, score, serve and the bare model on one NVIDIA GPU, inside 8 minutes in all.

Why: the development machines have no GPU, so the GPU paths (`--use-gpu`, `--gpus-per-actor`,
`gpus_per_replica`, the images/s that bench/capacity.py assumes) are only exercised where someone
lends one, for a few minutes. One command then runs them all, each step under its own time limit,
and leaves a JSON record per step plus a summary, also of what it skipped, did not finish or failed.

Steps, in this order (the cheapest, most-needed figure first; variants last, when time is left):

- prepare (when score or serve runs): the bundle (`bench/fixtures.make_bundle`, random weights: the
  same compute as ImageNet's) and a generated archive (`bench/fixtures.make_archive`), built
  with the GPU hidden so that no step holds GPU memory the next one needs;
- throughput: the bare compiled model (its bundle built here when prepare did not run),
  `eyeray.model.bundle.load(...).predict(images, batch_size=B)`
  at B = 64 and 256, images/s (on a GPU also with XLA and mixed precision when `load` takes them);
- train: `eyeray train oct --use-gpu ... --epochs 1` on the generated demo data;
- score: `eyeray score --gpus-per-actor 1` over the archive;
- serve: the Serve application of `eyeray serve --gpus-per-replica 1`, loaded by `bench/serve_load.load`;
- train_mixed_precision, score_accelerated: the same with `--mixed-precision` / `--jit-compile`, only
  when the CLI has those flags.

Each step runs in a child process (`--step NAME`) in a process group of its own: a step over its limit
is stopped (SIGTERM, then SIGKILL for the group, Ray's processes included) and reported, and each
step's TensorFlow starts with the GPU's memory free. Ray steps use a private Ray instance
(`ray.init(address="local")`), never a cluster someone else started. Without a usable GPU (no
`nvidia-smi`, or TensorFlow listing none) the GPU steps are skipped with one line each, and the
throughput step still runs, on the CPU.

    bash bench/gpu_check.sh                              # vgg16:224, writes bench/results/gpu_*.json
    bash bench/gpu_check.sh --model small_cnn:32 --images 32 --out /tmp/gpu-check

Exit status: 0 when every step that should run ran; 1 when a step failed, did not finish or found a
GPU that TensorFlow cannot use; 3 when Python packages are missing (listed on one line).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

T0 = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # eyeray and bench.* from this checkout, installed or not
RESULTS = REPO / "bench" / "results"
BUDGET_S = 470.0  # 8 minutes, less the last stop's grace and the summary
KILL_GRACE_S = 10.0  # after SIGTERM, before SIGKILL: Ray and Serve get to shut down
STOP_S = KILL_GRACE_S + 8  # a step's limit ends this long before the budget: its stop fits inside
BATCH_SIZES = (64, 256)
ACCEL_FLAGS = ("--jit-compile", "--mixed-precision")  # score's optional inference flags, when the CLI has them
PREFIX = "gpu_check:"

# Modules the steps import, and what to install for each (the GPU machine may have no package index:
# say everything that is missing at once, before any step starts).
REQUIRED = {
    "numpy": "numpy",
    "PIL": "pillow",
    "tensorflow": "tensorflow[and-cuda]==2.21.* (CPU only: tensorflow-cpu==2.21.*)",
    "keras": "keras>=3.10",
    "ray": "ray[data,train,tune,serve]==2.60.*",
    "fastapi": "fastapi (ray[serve])",
    "uvicorn": "uvicorn (ray[serve])",
    "pyarrow": "pyarrow",
    "pandas": "pandas",
    "pydantic": "pydantic",
    "httpx": "httpx",
    "psutil": "psutil",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "yaml": "pyyaml",
    "jinja2": "jinja2",
    "matplotlib": "matplotlib",
    "s3fs": "s3fs",
    "pydicom": "pydicom",
    "openpyxl": "openpyxl",
    "multipart": "python-multipart",
}


def say(line: str) -> None:
    print(f"{PREFIX} {line}", flush=True)


def elapsed() -> float:
    return time.monotonic() - T0


# --------------------------------------------------------------------------- the plan (data, testable)


@dataclass
class Step:
    """One step: its child-process function is `STEP_FUNCTIONS[name]`; `argv` is its `eyeray` command
    line (without the program name) where it has one; `skip` says why it will not run."""

    name: str
    what: str
    limit_s: float
    min_s: float = 20.0  # not started with less time than this left
    needs_gpu: bool = True
    argv: list[str] | None = None
    skip: str | None = None
    needs: tuple[str, ...] = ("prepare",)  # steps that must have run first


def cli_flags() -> dict[str, set[str]]:
    """The option strings of `eyeray train`, `score` and `serve`, read off the real parser, so the
    plan uses the flags the CLI has now (others add --mixed-precision and --jit-compile)."""
    from eyeray.cli import get_parser

    parser = get_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(sub.choices[name]._option_string_actions) for name in ("train", "score", "serve")}


def commands(work: Path, backbone: str, size: int, flags: dict[str, set[str]], port: int = 8000) -> dict[str, list]:
    """The `eyeray` command line of each CLI step (argv without the program name), as data: the
    tests parse every one with `eyeray.cli.get_parser()`, so a flag the CLI lacks fails there, not
    on a borrowed GPU. Variants appear only when the CLI has their flags."""
    bundle_uri, archive = str(work / "bundle"), str(work / "archive")
    train = ["train", "oct", "--backbone", backbone, "--image-size", str(size), "--weights", "none", "--epochs", "1"]
    train += ["--batch-size", "64", "--workers", "1", "--use-gpu"]
    out = {"train": [*train, "--output", str(work / "train")]}
    if "--mixed-precision" in flags.get("train", set()):
        out["train_mixed_precision"] = [*train, "--mixed-precision", "--output", str(work / "train-mixed-precision")]
    # --explain none: Grad-CAM overlays of a random-weight model's (all uncertain) rows are not scoring.
    score = ["score", "--bundle", bundle_uri, "--input", archive, "--gpus-per-actor", "1", "--batch-size", "64"]
    score += ["--no-report", "--explain", "none"]
    out["score"] = [*score, "--output", str(work / "scored")]
    accel = [f for f in ACCEL_FLAGS if f in flags.get("score", set())]
    if accel:
        out["score_accelerated"] = [*score, *accel, "--output", str(work / "scored-accelerated")]
    out["serve"] = ["serve", "--bundle", bundle_uri, "--gpus-per-replica", "1", "--max-batch-size", "32"]
    out["serve"] += ["--host", "127.0.0.1", "--port", str(port)]
    return out


def plan(
    work: Path, backbone: str, size: int, flags: dict[str, set[str]], gpu_reason: str | None, port: int
) -> list[Step]:
    """Every step, in running order, each with its limit and, where it will not run, why.
    `gpu_reason`: None with a usable GPU, else why there is none."""
    cmds = commands(work, backbone, size, flags, port)
    steps = [
        Step("prepare", "bundle and archive for score and serve, GPU hidden", 90, 15, False, needs=()),
        Step("throughput", f"bare model {backbone}@{size}, batch {' and '.join(map(str, BATCH_SIZES))}", 90, 15, False),
        Step("train", "1-epoch --use-gpu training on the generated data", 150, argv=cmds["train"], needs=()),
        Step("score", "scoring with --gpus-per-actor 1 over a generated archive", 90, argv=cmds["score"]),
        Step("serve", "Ray Serve, a replica holding 1 GPU, under load", 90, argv=cmds["serve"]),
        Step(
            "train_mixed_precision",
            "the training again with --mixed-precision",
            90,
            argv=cmds.get("train_mixed_precision"),
            needs=(),
        ),
        Step(
            "score_accelerated",
            "the scoring again with --jit-compile/--mixed-precision",
            60,
            argv=cmds.get("score_accelerated"),
        ),
    ]
    for step in steps:
        if step.needs_gpu and gpu_reason:
            step.skip = f"needs a GPU: {gpu_reason}"
        elif step.name == "train_mixed_precision" and step.argv is None:
            step.skip = "`eyeray train` has no --mixed-precision flag"
        elif step.name == "score_accelerated" and step.argv is None:
            step.skip = "`eyeray score` has neither --jit-compile nor --mixed-precision"
    return steps


def settle(steps: list[Step]) -> list[Step]:
    """After the skips are known: prepare runs only for the steps that need it (on a CPU machine the
    throughput step, alone, builds its bundle itself: one TensorFlow start less), and the
    throughput step waits for it only when it runs."""
    prepare = steps[0]
    users = [s.name for s in steps[2:] if "prepare" in s.needs and not s.skip]
    if not prepare.skip and not users:
        prepare.skip = "no step needs the archive (the throughput step builds its bundle itself)"
    steps[1].needs = () if prepare.skip else ("prepare",)
    return steps


# --------------------------------------------------------------------------- machine checks


def missing_modules() -> dict[str, str]:
    """Required modules that cannot be imported here (found without importing them: fast)."""
    missing = {}
    for module, pip_name in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing[module] = pip_name
    return missing


def nvidia_smi(query: str, timeout: float = 20) -> list[list[str]] | str:
    """Rows of `nvidia-smi --query-gpu=QUERY` (csv, no header, no units), or why there are none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi is not on PATH"
    try:
        proc = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    rows = [[c.strip() for c in line.split(",")] for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not rows:
        return f"nvidia-smi lists no GPU (exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]})"
    return rows


TF_PROBE = (
    "import json, os; os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2'); import tensorflow as tf; "
    "print(json.dumps({'version': tf.__version__, 'cuda': tf.test.is_built_with_cuda(), "
    "'gpus': [d.name for d in tf.config.list_physical_devices('GPU')]}))"
)


def detect_gpu(env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Whether the GPU steps can run: nvidia-smi lists a GPU, and TensorFlow (in a child process,
    so this one holds no CUDA context) lists one too. `reason` says why not; `error` is set when
    there is a GPU that TensorFlow cannot use (a failure of the check, not a plain CPU machine)."""
    rows = nvidia_smi("name,memory.total,driver_version")
    if isinstance(rows, str):
        return {"usable": False, "reason": f"no NVIDIA GPU ({rows})", "error": False}
    info: dict[str, Any] = {"nvidia_smi": [{"name": r[0], "memory_mib": r[1], "driver": r[-1]} for r in rows]}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", TF_PROBE], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
        )
        tf_info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        proc, tf_info = None, None
        info["tensorflow_error"] = str(exc)
    if tf_info is None:
        tail = proc.stderr.strip().splitlines()[-1:] if proc is not None else []
        why = " ".join(tail) or info.get("tensorflow_error")
        reason = f"nvidia-smi lists {rows[0][0]}, but TensorFlow did not start: {why}"
        return {**info, "usable": False, "reason": reason, "error": True}
    info["tensorflow"] = tf_info
    if not tf_info["gpus"]:
        reason = (
            f"nvidia-smi lists {rows[0][0]}, but TensorFlow {tf_info['version']} lists no GPU "
            f"(built with CUDA: {tf_info['cuda']}; install tensorflow[and-cuda], not tensorflow-cpu)"
        )
        return {**info, "usable": False, "reason": reason, "error": True}
    return {**info, "usable": True, "reason": None, "error": False}


class GpuSampler:
    """GPU utilisation and memory while a step runs (nvidia-smi once a second): evidence that the step
    used the GPU, beside its own figures."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.util, self.memory = interval, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = nvidia_smi("utilization.gpu,memory.used", timeout=5)
            if isinstance(rows, list):
                with contextlib.suppress(ValueError, IndexError):
                    self.util.append(max(float(r[0]) for r in rows))
                    self.memory.append(sum(float(r[1]) for r in rows))
            self._stop.wait(self.interval)

    def figures(self) -> dict[str, Any]:
        if not self.util:
            return {"samples": 0}
        return {
            "samples": len(self.util),
            "max_utilization_pct": max(self.util),
            "mean_utilization_pct": round(sum(self.util) / len(self.util), 1),
            "max_memory_used_mib": max(self.memory),
        }


# --------------------------------------------------------------------------- steps (run in a child process)


def private_ray(work: Path) -> None:
    """A Ray instance of this process alone: address "local" (never a running cluster), its own temp
    folder, and eyeray's own token handling, so ~/.ray/auth_token is not created (STACK-NOTES)."""
    import logging

    import ray

    from eyeray import cluster

    os.environ.pop("RAY_ADDRESS", None)
    cluster.private_local_token()
    ray.init(
        address="local",
        include_dashboard=False,
        _temp_dir=str(work / "ray"),
        runtime_env=cluster.runtime_env(False),
        logging_level=logging.WARNING,
    )


def run_cli(argv: list[str]) -> None:
    """The real `eyeray` command, in this process (which already runs the private Ray)."""
    from eyeray.cli import main

    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"eyeray {' '.join(argv)} exited {rc}")


def step_prepare(ctx: dict) -> dict:
    """The bundle every later step uses, and the archive when score or serve will run."""
    from bench.fixtures import make_archive, make_bundle

    work = Path(ctx["work"])
    start = time.perf_counter()
    uri = str(Path(make_bundle(work, ctx["backbone"], ctx["image_size"])).rename(work / "bundle"))
    out: dict[str, Any] = {"bundle": uri, "bundle_seconds": round(time.perf_counter() - start, 2)}
    if ctx["archive_images"]:
        start = time.perf_counter()
        make_archive(work / "archive", ctx["archive_images"])
        out.update(archive=str(work / "archive"), archive_images=ctx["archive_images"])
        out["archive_seconds"] = round(time.perf_counter() - start, 2)
    return out


def _time_predict(model: Any, images: Any, batch_size: int, repeats: int) -> dict:
    """images/s of `model.predict` over whole batches (or the one partial batch there is), after a
    warm-up call of the same shape: tracing and XLA compiling are not throughput."""
    n = len(images) if len(images) < batch_size else len(images) // batch_size * batch_size
    timed = images[:n]
    model.predict(timed[:batch_size], batch_size=batch_size)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(timed, batch_size=batch_size)
        seconds.append(time.perf_counter() - start)
    best, median = min(seconds), sorted(seconds)[len(seconds) // 2]
    return {
        "batch_size": batch_size,
        "images": n,
        "repeats": repeats,
        "best_seconds": round(best, 4),
        "images_per_s": round(n / best, 1),
        "median_images_per_s": round(n / median, 1),
    }


def throughput_variants(on_gpu: bool, load_params: set[str], wanted: str) -> list[dict[str, bool]]:
    """Plain first, then XLA, then mixed precision: TensorFlow's mixed-precision rewrite is
    process-wide once on, so the runs before it are float32. Variants only on a GPU unless asked
    for ("all"); only those `bundle.load` takes."""
    if wanted == "plain" or (wanted == "auto" and not on_gpu):
        return [{}]
    options = [{}, {"jit_compile": True}, {"mixed_precision": True}, {"jit_compile": True, "mixed_precision": True}]
    return [v for v in options if set(v) <= load_params]


def step_throughput(ctx: dict) -> dict:
    import inspect

    import numpy as np
    import tensorflow as tf

    from eyeray.model import bundle

    built = step_prepare({**ctx, "archive_images": 0}) if not Path(ctx["bundle"]).is_dir() else None
    gpus = tf.config.list_physical_devices("GPU")
    device = "gpu" if gpus else "cpu"
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    params = set(inspect.signature(bundle.load).parameters)
    size = ctx["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (ctx["images"], size, size, 3), dtype=np.uint8)
    runs = []
    for variant in throughput_variants(bool(gpus), params, ctx["variants"]):
        model = bundle.load(ctx["bundle"], **variant)
        for batch_size in BATCH_SIZES:
            row = {"jit_compile": False, "mixed_precision": False, **variant}
            row.update(_time_predict(model, images, batch_size, ctx["repeats"]))
            runs.append(row)
            print("throughput", json.dumps(row), flush=True)
    return {
        "device": device,
        "device_name": details.get("device_name") or (platform.processor() or platform.machine()),
        "tensorflow": tf.__version__,
        "model": f"{ctx['backbone']}:{size}",
        "how": "eyeray.model.bundle.load(uri, **variant).predict(uint8 images, batch_size=B), best of repeats",
        "bundle_built_by_this_step": built is not None,
        "runs": runs,
    }


def timed_cli(ctx: dict) -> tuple[Path, float]:
    """Run the step's `eyeray` command on a private Ray instance: (its --output, wall seconds)."""
    private_ray(Path(ctx["work"]))
    output = Path(ctx["argv"][ctx["argv"].index("--output") + 1])
    start = time.perf_counter()
    run_cli(ctx["argv"])
    return output, time.perf_counter() - start


def step_train(ctx: dict) -> dict:
    output, seconds = timed_cli(ctx)
    metrics_file = output / "report" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "wall_seconds": round(seconds, 2),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)},
        "bundle_written": (output / "bundle" / "manifest.json").is_file(),
    }


step_train_mixed_precision = step_train


def step_score(ctx: dict) -> dict:
    output, seconds = timed_cli(ctx)
    summary_file = output / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    keys = ("files_seen", "scored", "errors", "wall_seconds", "images_per_s_this_run", "inference_this_run")
    return {
        "wall_seconds": round(seconds, 2),
        "end_to_end_images_per_s": round(summary.get("scored", 0) / seconds, 2),
        "summary": {k: summary.get(k) for k in keys},
    }


step_score_accelerated = step_score


def step_serve(ctx: dict) -> dict:
    """The application `eyeray serve` builds from these flags (`eyeray.cli.serve_args`), so the
    replica holds `gpus_per_replica=1`; run in this process so it can be loaded and stopped."""
    import ray
    from ray import serve

    from bench.serve_load import load
    from eyeray.cli import get_parser, serve_args
    from eyeray.serve import build_app

    ns = get_parser().parse_args(ctx["argv"])
    args = serve_args(ns)
    images = [p.read_bytes() for p in sorted(Path(ctx["work"], "archive").glob("*.jpeg"))[:16]]
    private_ray(Path(ctx["work"]))
    url = f"http://{ns.host}:{ns.port}"
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_app(args), name="gpu_check", route_prefix="/")
        held = ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)
        load(url, images, 4, 32)  # warm-up: traces the batch shapes the runs will see
        runs = [load(url, images, clients, ctx["serve_requests"]) for clients in (1, 16)]
        for row in runs:
            print("serve", json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "gpus_per_replica": args.gpus_per_replica,
        "gpus_held_while_serving": held,
        "max_batch_size": args.max_batch_size,
        "runs": runs,
    }


STEP_FUNCTIONS = {
    "prepare": step_prepare,
    "throughput": step_throughput,
    "train": step_train,
    "score": step_score,
    "serve": step_serve,
    "train_mixed_precision": step_train_mixed_precision,
    "score_accelerated": step_score_accelerated,
}


def child_main(name: str, ctx_path: Path) -> int:
    """`--step NAME`: run one step here, write its result where the parent reads it. SIGTERM (the
    parent's time limit) becomes SystemExit, so Serve and Ray shut down in their `finally`."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    sys.path.insert(0, str(REPO))
    ctx = json.loads(ctx_path.read_text())
    result = STEP_FUNCTIONS[name](ctx)
    Path(ctx["result"]).write_text(json.dumps(result, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------- the parent: limits and records


def child_env(hide_gpu: bool = False) -> dict[str, str]:
    """The children's environment: the repo importable (no install needed on a borrowed machine),
    TensorFlow's memory growth on (a driver and its Ray workers share the GPU), Ray quiet and
    private (no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        TF_FORCE_GPU_ALLOW_GROWTH="true",
        RAY_USAGE_STATS_ENABLED="0",
    )
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step (its `finally` shuts Ray down), then SIGKILL to its whole process group
    and any descendant that left it: nothing of a stopped step outlives it."""
    descendants = []
    with contextlib.suppress(Exception):
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(Exception):
            child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def tail(path: Path, lines: int = 30) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def run_step(step: Step, ctx: dict, limit: float, work: Path, sample_gpu: bool) -> dict:
    """One step in a child process under `limit` seconds; its record (status, seconds, reason, result)."""
    log_path, ctx_path, result_path = (work / f"{step.name}.{ext}" for ext in ("log", "ctx.json", "result.json"))
    ctx = {**ctx, "argv": step.argv, "result": str(result_path)}
    ctx_path.write_text(json.dumps(ctx))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--ctx", str(ctx_path)]
    start = time.monotonic()
    timed_out = False
    sampler = GpuSampler() if sample_gpu else contextlib.nullcontext()
    with open(log_path, "w") as log, sampler:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env(hide_gpu=step.name == "prepare"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            stop_group(proc)  # also after a clean exit: no Ray process of the step lingers
    seconds = round(time.monotonic() - start, 1)
    record: dict[str, Any] = {"step": step.name, "what": step.what, "limit_s": round(limit, 1), "seconds": seconds}
    if step.argv is not None:
        record["command"] = ["eyeray", *step.argv]
    if isinstance(sampler, GpuSampler):
        record["gpu_while_running"] = sampler.figures()
    if timed_out:
        record.update(status="failed", timed_out=True, reason=f"did not finish within its {limit:.0f} s limit")
    elif proc.returncode != 0 or not result_path.is_file():
        last = [line for line in tail(log_path) if line.strip()]
        record.update(status="failed", reason=f"exit {proc.returncode}: {last[-1] if last else 'no output'}")
    else:
        record.update(status="ran", result=json.loads(result_path.read_text()))
    if record["status"] != "ran":
        record["log_tail"] = tail(log_path)
    return record


def headline(record: dict) -> str:
    """A few words of a step's figures for its console line."""
    result = record.get("result") or {}
    if record["step"] == "throughput":
        runs = ", ".join(
            f"B={r['batch_size']}{' xla' if r['jit_compile'] else ''}{' mp' if r['mixed_precision'] else ''} "
            f"{r['images_per_s']:g} img/s"
            for r in result.get("runs", [])
        )
        return f"{result.get('device')} ({result.get('device_name')}): {runs}"
    if record["step"].startswith("score"):
        return f"{result.get('end_to_end_images_per_s')} images/s end to end, {result.get('summary')}"
    if record["step"] == "serve":
        rows = result.get("runs", [])
        return ", ".join(f"{r['clients']} clients {r['requests_per_s']} req/s p95 {r['p95_ms']} ms" for r in rows)
    if record["step"].startswith("train"):
        return f"metrics {result.get('metrics')}"
    return ", ".join(f"{k} {v}" for k, v in result.items() if k.endswith("seconds"))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="vgg16:224", help="BACKBONE:SIZE of every step's model")
    parser.add_argument("--images", type=int, default=2048, help="images for the throughput step and the archive")
    parser.add_argument("--out", default=str(RESULTS), help="folder for gpu_*.json")
    parser.add_argument("--steps", help="comma list of steps to run (default: all; prepare runs when needed)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run stops itself within this")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per throughput figure (the best counts)")
    parser.add_argument("--serve-requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument(
        "--throughput-variants",
        choices=("auto", "plain", "all"),
        default="auto",
        help="auto: XLA and mixed-precision variants on a GPU only",
    )
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step (a child process)
    parser.add_argument("--ctx", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backbone, _, size = args.model.partition(":")
    if not backbone or not size.isdigit():
        parser.error(f"--model {args.model!r}: use BACKBONE:SIZE, e.g. vgg16:224")
    args.backbone, args.image_size = backbone, int(size)
    unknown = set((args.steps or "").split(",")) - set(STEP_FUNCTIONS) - {""}
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; choose from {', '.join(STEP_FUNCTIONS)}")
    return args


def budget_spent(signum, frame) -> None:
    """The parent's backstop (SIGALRM): every step's limit ends before the budget, so this fires only
    if the parent itself hangs; the TimeoutError still records what ran and stops the child."""
    raise TimeoutError("the time budget (--budget-s) is spent")


def main(argv: list[str] | None = None) -> int:
    global T0
    T0 = time.monotonic()  # the budget counts from here (also when called in-process, as tests do)
    args = parse_args(argv)
    if args.step:
        return child_main(args.step, Path(args.ctx))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "check": "gpu_check",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "model": args.model,
        "images": args.images,
        "budget_s": args.budget_s,
        "steps": [],
    }
    missing = missing_modules()
    if missing:
        listed = "; ".join(f"{m} (pip install {p})" for m, p in missing.items())
        say(f"cannot run: missing Python packages: {listed}")
        say("install them (on a machine without a package index: carry wheels), then run again")
        summary.update(exit_code=3, reason=f"missing Python packages: {', '.join(missing)}")
        summary["seconds"] = round(elapsed(), 1)
        write_json(out / "gpu_check.json", summary)
        return 3

    deadline = T0 + args.budget_s
    # The parent's backstop: whatever hangs, the run ends inside the budget (plus the last grace).
    signal.signal(signal.SIGALRM, budget_spent)
    signal.alarm(int(args.budget_s) + 2)
    work = Path(tempfile.mkdtemp(prefix="eyeray-gpu-check-"))
    exit_code = 0
    try:
        gpu = detect_gpu(child_env())
        summary["gpu"] = gpu
        if gpu["usable"]:
            names = ", ".join(f"{g['name']} ({g['memory_mib']} MiB)" for g in gpu["nvidia_smi"])
            say(f"GPU: {names}; TensorFlow {gpu['tensorflow']['version']} sees {gpu['tensorflow']['gpus']}")
        else:
            say(f"GPU: none usable: {gpu['reason']}; the GPU steps are skipped")
            exit_code = 1 if gpu["error"] else 0
        flags = cli_flags()
        steps = plan(work, args.backbone, args.image_size, flags, gpu["reason"], free_port())
        wanted = set(STEP_FUNCTIONS) if args.steps is None else {"prepare", *args.steps.split(",")}
        for step in steps:
            if step.name not in wanted:
                step.skip = "not asked for (--steps)"
        settle(steps)
        ctx = {
            "work": str(work),
            "backbone": args.backbone,
            "image_size": args.image_size,
            "images": args.images,
            "archive_images": 0 if steps[0].skip else args.images,
            "bundle": str(work / "bundle"),
            "repeats": args.repeats,
            "serve_requests": args.serve_requests,
            "variants": args.throughput_variants,
        }
        done: dict[str, str] = {}
        for step in steps:
            left = deadline - time.monotonic()
            limit = min(step.limit_s, left - STOP_S)
            failed_need = [n for n in step.needs if done.get(n) != "ran"]
            if step.skip:
                record = {"step": step.name, "what": step.what, "status": "skipped", "seconds": 0, "reason": step.skip}
                say(f"SKIPPED {step.name} ({step.what}): {step.skip}")
            elif failed_need:
                record = {"step": step.name, "what": step.what, "status": "skipped", "seconds": 0}
                record["reason"] = f"{', '.join(failed_need)} did not run"
                say(f"SKIPPED {step.name}: {record['reason']}")
                exit_code = 1
            elif limit < step.min_s:
                record = {"step": step.name, "what": step.what, "status": "failed", "seconds": 0, "timed_out": True}
                record["reason"] = f"not started: {max(left, 0):.0f} s of the {args.budget_s:.0f} s budget left"
                say(f"NOT RUN {step.name}: {record['reason']}")
                exit_code = 1
            else:
                say(f"{step.name}: {step.what} (limit {limit:.0f} s) ...")
                record = run_step(step, ctx, limit, work, sample_gpu=bool(gpu["usable"]) and step.name != "prepare")
                result_file = out / f"gpu_{step.name}.json"
                if step.name != "prepare":
                    write_json(result_file, {**record, "model": args.model, "gpu": gpu.get("nvidia_smi")})
                    record["file"] = str(result_file)
                if record["status"] == "ran":
                    say(f"{step.name}: ran in {record['seconds']} s: {headline(record)}")
                else:
                    say(f"FAILED {step.name} after {record['seconds']} s: {record['reason']}")
                    for line in record.get("log_tail", [])[-12:]:
                        print(f"    {line}", flush=True)
                    exit_code = 1
            done[step.name] = record["status"]
            summary["steps"].append({k: v for k, v in record.items() if k not in ("result", "log_tail")})
    except Exception as exc:  # the check itself broke (a TimeoutError from the backstop too): say so in the record
        traceback.print_exc()
        summary["error"] = f"{type(exc).__name__}: {exc}"
        exit_code = 1
    finally:
        signal.alarm(0)
        if exit_code == 0:
            shutil.rmtree(work, ignore_errors=True)  # else kept: the steps' full logs
    counts = {s: sum(r["status"] == s for r in summary["steps"]) for s in ("ran", "skipped", "failed")}
    summary.update(counts=counts, exit_code=exit_code, seconds=round(elapsed(), 1))
    if exit_code:
        summary["logs"] = str(work)
    write_json(out / "gpu_check.json", summary)
    say(
        f"{counts['ran']} ran, {counts['skipped']} skipped, {counts['failed']} failed in {summary['seconds']} s "
        f"(budget {args.budget_s:.0f} s); wrote {out / 'gpu_check.json'}" + (f"; logs in {work}" if exit_code else "")
    )
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
