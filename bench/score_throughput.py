"""Batch-scoring throughput and memory: the Ray Data pipeline vs the bare model vs a seed-style loop.

Over a generated archive of OCT-sized greyscale JPEGs (1024 x 496, as Kermany's B-scans), on one
machine, in one run (it is shared and noisy, so ratios are what mean something):

- bare model: `Bundle.predict` on tensors already decoded and resized in memory;
- pipeline: `eyeray.score.run` (list -> decode tasks -> model actor -> Parquet shards, without
  Grad-CAM overlays), end to end and in steady state (runs over n and 2 n images after a discarded
  one-batch run: the difference cancels the start-up);
- seed-style: open each image with PIL, resize, `model.predict` one image at a time, as the
  seed notebooks served predictions;
- with `--mixed-precision` (where the hardware has a 16-bit type: bfloat16 on CPUs with it): the
  pipeline again (n and 2 n) and the bare model, in a fresh worker process (the rewrite is
  process-wide); the seed-style loop stays float32, as the seeds ran;
- memory: peak RSS of the driver and of the Ray worker processes while scoring N and 10 N images;
- the speed table: the four figures with targets (pipeline vs seed-style loop, end to end vs bare
  model, training fed by Ray Data vs memory with augmentation, Serve batched vs unbatched at 16
  clients), the last two by bench/train_ingest.py's and bench/serve_load.py's own measurements, so
  every row comes from this one run.

    python bench/score_throughput.py            # writes bench/results/score_throughput.json
    python bench/readme.py                      # then regenerates the README's benchmark section

At n = 128 and 256 the pipeline's start-up (Ray workers, actors, model load) is a large part of the
end-to-end time. `--archive-images N` measures only the end-to-end figure, over one archive of N
images (2,000: an export a site scores in one go) in a fresh Ray session, start-up included and
amortised, with the bare model's images/s before and after it; it writes
bench/results/score_throughput_N.json and leaves score_throughput.json alone:

    python bench/score_throughput.py --archive-images 2000
    python bench/score_throughput.py --archive-images 2000 --gpus-per-actor 1 --batch-size 64 --out F.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

import psutil  # noqa: E402
import ray  # noqa: E402

from bench import serve_load, train_ingest  # noqa: E402
from bench.fixtures import OCT_SHAPE, make_archive, make_bundle  # noqa: E402
from eyeray.data import imaging, synthetic
from eyeray.data.files import list_inputs as list_archive  # noqa: E402
from eyeray.model import bundle
from eyeray.model.devices import mixed_precision_dtype
from eyeray.model.options import InferenceOptions
from eyeray.score import ScoreConfig, run
from eyeray.tasks import get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class PeakRSS:
    """Samples RSS of this process (the driver) and of every Ray worker process, keeping peaks."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.driver, self.workers_total, self.worker_max = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            sizes = []
            for proc in me.children(recursive=True):  # ray.init() here started this cluster: its workers
                try:
                    if " ".join(proc.cmdline()).startswith("ray::"):
                        sizes.append(proc.memory_info().rss)
                except psutil.Error:
                    pass
            self.workers_total = max(self.workers_total, sum(sizes))
            self.worker_max = max(self.worker_max, max(sizes, default=0))
            self._stop.wait(self.interval)

    def figures(self) -> dict:
        mib = 1 << 20
        return {
            "driver_mib": round(self.driver / mib),
            "workers_total_mib": round(self.workers_total / mib),
            "largest_worker_mib": round(self.worker_max / mib),
        }


def bare_model(
    bundle_uri: str, files: list[str], batch_size: int, mixed_precision: bool = False, jit_compile: bool = False
) -> dict:
    b = bundle.load(bundle_uri, inference=InferenceOptions(jit_compile=jit_compile, mixed_precision=mixed_precision))
    images = np.stack([imaging.preprocess(imaging.decode(Path(f).read_bytes()), b.image_size) for f in files])
    b.predict(images[:batch_size], batch_size=batch_size)  # warm-up: graph tracing is not throughput
    start = time.perf_counter()
    b.predict(images, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"images": len(files), "seconds": round(seconds, 2), "images_per_s": round(len(files) / seconds, 2)}


def seed_style(bundle_uri: str, files: list[str]) -> dict:
    """As the seeds did it: PIL open, convert, resize, then model.predict on one image."""
    b = bundle.load(bundle_uri)
    size = b.image_size
    b.model.predict(np.zeros((1, size, size, 3), np.uint8), verbose=0)
    start = time.perf_counter()
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB").resize((size, size)))
        b.model.predict(img[None], verbose=0)
    seconds = time.perf_counter() - start
    return {"images": len(files), "seconds": round(seconds, 2), "images_per_s": round(len(files) / seconds, 2)}


def bare_model_mixed(bundle_uri: str, files: list[str], batch_size: int) -> dict:
    """`bare_model` with `--mixed-precision`, in a fresh Ray worker process that exits after it
    (`max_calls=1`): the precision rewrite is process-wide, and the seed-style loop stays float32."""
    task = ray.remote(max_calls=1, num_cpus=ray.cluster_resources()["CPU"])(bare_model)
    return ray.get(task.remote(bundle_uri, files, batch_size, True))


def pipeline(
    bundle_uri: str,
    archive: Path,
    output: Path,
    batch_size: int,
    mixed_precision: bool = False,
    gpus_per_actor: float = 0.0,
    jit_compile: bool = False,
) -> dict:
    """`eyeray.score.run` end to end: wall time includes starting the actors and loading the model."""
    start = time.perf_counter()
    summary = run(
        ScoreConfig(
            bundles=[bundle_uri],
            input=str(archive),
            output=str(output),
            batch_size=batch_size,
            report=False,
            # Like for like with the bare model and the seed loop: no Grad-CAM. With random weights every
            # case falls below the review level, so the default (`review`) would explain every image.
            explain="none",
            gpus_per_actor=gpus_per_actor,
            inference=InferenceOptions(jit_compile=jit_compile, mixed_precision=mixed_precision),
        )
    )
    wall = time.perf_counter() - start
    return {
        "images": summary["scored_this_run"],
        "errors": summary["errors"],
        "wall_seconds": round(wall, 2),
        "end_to_end_images_per_s": round(summary["scored_this_run"] / wall, 2),
    }


def steady_pipeline(bundle_uri: str, tmp: Path, n: int, batch_size: int, mixed_precision: bool = False) -> dict:
    """Steady-state pipeline throughput by difference: runs over n and 2n images pay the same
    start-up (actors, model load, first batch), so n / (t(2n) - t(n)) is what the running pipeline does.

    A discarded run over one batch goes first. Without it the n run alone paid the Ray session's
    first-job costs (worker processes starting, importing eyeray and TensorFlow), the difference
    came out too small, and the steady figure above the bare model's (measured: 21 images/s
    against 14.5); on a running cluster those processes are already there."""
    archives = {k: tmp / f"archive-{k}" for k in ("warm-up", "1x", "2x")}
    if not archives["1x"].exists():  # the float32 and the mixed-precision runs score the same files
        make_archive(archives["warm-up"], batch_size)
        make_archive(archives["1x"], n)
        make_archive(archives["2x"], 2 * n)
    scored = "scored-mixed" if mixed_precision else "scored"
    warm_up = pipeline(bundle_uri, archives["warm-up"], tmp / f"{scored}-warm-up", batch_size, mixed_precision)
    small = pipeline(bundle_uri, archives["1x"], tmp / f"{scored}-1x", batch_size, mixed_precision)
    large = pipeline(bundle_uri, archives["2x"], tmp / f"{scored}-2x", batch_size, mixed_precision)
    extra = large["wall_seconds"] - small["wall_seconds"]
    return {
        "warm_up": warm_up,
        "n": small,
        "2n": large,
        "steady_images_per_s": round(n / extra, 2) if extra > 0 else None,
        "startup_seconds": round(small["wall_seconds"] - extra, 2),
    }


def measure_training_and_serving(args: argparse.Namespace) -> dict:
    """The two rows of the speed table this script does not measure itself, by the benchmarks that
    own them (each starts and stops a Ray instance of its own): small_cnn @ 64 training with
    augmentation, and Serve at 16 clients."""
    ray.init(include_dashboard=False, num_cpus=os.cpu_count())
    try:
        with tempfile.TemporaryDirectory(prefix="eyeray-bench-") as tmp:
            # 4 s epochs: 8 interleaved rounds are cheap and steady the ratio on a shared machine
            ingest_args = argparse.Namespace(task="oct", batch_size=32, rounds=8, images_per_class=250)
            data = str(synthetic.make_dataset(get_task("oct"), tmp, images_per_class=250, seed=0))
            training = train_ingest.measure(ingest_args, "small_cnn", 64, True, data)
    finally:
        ray.shutdown()
    serving = serve_load.measure(serve_load.parse_args(["--clients", "16", "--requests", str(args.serve_requests)]))
    return {"train_ingest": training, "serve_load": serving}


def speed_table(throughput: dict, other: dict | None) -> list[dict]:
    """Issue 15's table: each figure with its target, all measured in this run."""
    rows = [
        {
            "figure": f"scoring pipeline (steady) / seed-style loop, {throughput['model']}",
            "value": throughput["ratio_pipeline_steady_vs_seed_style"],
            "target": 3.0,
        },
        {
            "figure": "end-to-end pipeline (2n images, start-up included) / bare model",
            "value": throughput["ratio_pipeline_end_to_end_2n_vs_bare"],
            "target": 0.8,
        },
    ]
    mixed = throughput.get("mixed_precision")
    if mixed and mixed["precision"] != "float32":  # the same two rows with `--mixed-precision`, where it does something
        rows += [
            {
                "figure": f"the same, `--mixed-precision` ({mixed['precision']}; the seed loop stays float32)",
                "value": mixed["ratio_pipeline_steady_vs_seed_style"],
                "target": 3.0,
            },
            {
                "figure": f"the same, `--mixed-precision` (pipeline and bare model both {mixed['precision']})",
                "value": mixed["ratio_pipeline_end_to_end_2n_vs_bare"],
                "target": 0.8,
            },
        ]
    if other:
        ingest, serving = other["train_ingest"], other["serve_load"]
        rows += [
            {
                "figure": f"training steps/s fed by Ray Data / in memory, with augmentation (in the trainer's "
                f"thread, the default on CPUs), {ingest['backbone']} @ {ingest['image_size']}",
                "value": ingest["ratio_ray_data_vs_memory"],
                "target": 0.9,
            },
            {
                "figure": f"Serve with `@serve.batch` / without, 16 clients, {serving['backbone']} @ "
                f"{serving['image_size']} (target for GPUs)",
                "value": serving["batched_over_unbatched_at_max_clients"],
                "target": 2.0,
            },
        ]
    return rows


def machine() -> dict:
    """What the running Ray instance has, and the platform."""
    resources = ray.cluster_resources()
    return {"cpus": resources.get("CPU"), "gpus": resources.get("GPU", 0), "platform": platform.platform()}


def at_archive_size(args: argparse.Namespace) -> Path:
    """`--archive-images N`: one end-to-end run over N images in a fresh Ray session (start-up
    included, amortised over N), the bare model's images/s before and after it (the machine's load
    drifts) over `--images` of the same files; its own result file."""
    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count())  # never someone's cluster
    n = args.archive_images
    out: dict = {
        "benchmark": "score_throughput_at_archive_size",
        "machine": machine(),
        "archive": f"{n} greyscale JPEGs {OCT_SHAPE[0]}x{OCT_SHAPE[1]}, quality 90",
        "how": "eyeray.score.run over the whole archive, first job of a fresh Ray session, no Grad-CAM",
        "model": args.model,
        "batch_size": args.batch_size,
        "gpus_per_actor": args.gpus_per_actor,
        "jit_compile": args.jit_compile,
        "mixed_precision": args.mixed_precision,
    }
    started = time.perf_counter()
    out["load_average_before"] = os.getloadavg()  # the machine is shared: other work slows every figure
    with tempfile.TemporaryDirectory(prefix="eyeray-bench-") as tmp:
        tmp = Path(tmp)
        backbone, size = args.model.split(":")
        model = make_bundle(tmp, backbone, int(size))
        archive = make_archive(tmp / "archive", n)
        sample = list_archive(str(archive))[: args.images]
        accel = {"jit_compile": args.jit_compile, "mixed_precision": args.mixed_precision}
        piped = pipeline(model, archive, tmp / "scored", args.batch_size, gpus_per_actor=args.gpus_per_actor, **accel)
        print("pipeline", piped, flush=True)
        bare = [bare_model(model, sample, args.batch_size, **accel) for _ in range(2)]
        print("bare model", bare, flush=True)
    ray.shutdown()
    bare_rate = round(sum(b["images_per_s"] for b in bare) / len(bare), 2)
    out["pipeline"] = piped
    out["bare_model"] = {"runs": bare, "images_per_s": bare_rate}
    out["ratio_pipeline_end_to_end_vs_bare"] = round(piped["end_to_end_images_per_s"] / bare_rate, 3)
    out["benchmark_wall_seconds"] = round(time.perf_counter() - started, 1)
    out["load_average_after"] = os.getloadavg()
    path = Path(args.out) if args.out else RESULTS / f"score_throughput_{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16:224", help="backbone:size for the throughput figures")
    parser.add_argument("--images", type=int, default=128, help="n for the throughput figures (runs n and 2 n)")
    parser.add_argument("--seed-images", type=int, default=48, help="images for the seed-style loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-model", default="small_cnn:64", help="backbone:size for the memory figures")
    parser.add_argument("--memory-images", type=int, default=400, help="N for the N vs 10 N memory figures")
    parser.add_argument("--serve-requests", type=int, default=96, help="requests at 16 clients, batched and not")
    parser.add_argument("--no-table", action="store_true", help="skip the training and Serve rows of the table")
    parser.add_argument(
        "--archive-images",
        type=int,
        help="only the end-to-end figure over one archive of this many images (e.g. 2000), start-up amortised",
    )
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per model actor (--archive-images)")
    parser.add_argument("--jit-compile", action="store_true", help="XLA in the pipeline (--archive-images)")
    parser.add_argument("--mixed-precision", action="store_true", help="16-bit compute, both ways (--archive-images)")
    parser.add_argument("--out", help="result file of --archive-images (default bench/results/score_throughput_N.json)")
    args = parser.parse_args()
    if args.archive_images:
        at_archive_size(args)
        return
    ray.init(include_dashboard=False, num_cpus=os.cpu_count())
    out: dict = {
        "benchmark": "score_throughput",
        "machine": machine(),
        "archive": f"greyscale JPEG {OCT_SHAPE[0]}x{OCT_SHAPE[1]}, quality 90",
        "targets": {"pipeline_vs_bare": 0.9, "pipeline_vs_seed_style": 3.0, "rss_10n_vs_n": 1.15},
    }
    with tempfile.TemporaryDirectory(prefix="eyeray-bench-") as tmp:
        tmp = Path(tmp)
        backbone, size = args.model.split(":")
        model = make_bundle(tmp, backbone, int(size))
        files = list_archive(str(make_archive(tmp / "archive", args.images)))
        bare_before = bare_model(model, files, args.batch_size)
        print("bare model", bare_before, flush=True)
        piped = steady_pipeline(model, tmp, args.images, args.batch_size)
        print("pipeline", piped, flush=True)
        bare_after = bare_model(model, files, args.batch_size)  # before and after: the machine's load drifts
        print("bare model", bare_after, flush=True)
        seed = seed_style(model, files[: args.seed_images])
        print("seed-style", seed, flush=True)
        mixed = {
            "precision": mixed_precision_dtype() or "float32",
            "pipeline": steady_pipeline(model, tmp, args.images, args.batch_size, mixed_precision=True),
            "bare_model": bare_model_mixed(model, files, args.batch_size),
        }
        print("mixed precision", mixed, flush=True)
        bare = round((bare_before["images_per_s"] + bare_after["images_per_s"]) / 2, 2)
        out["throughput"] = {
            "model": args.model,
            "batch_size": args.batch_size,
            "bare_model_before": bare_before,
            "bare_model_after": bare_after,
            "bare_model_images_per_s": bare,
            "pipeline": piped,
            "seed_style": seed,
            "ratio_pipeline_steady_vs_bare": round(piped["steady_images_per_s"] / bare, 3),
            "ratio_pipeline_end_to_end_2n_vs_bare": round(piped["2n"]["end_to_end_images_per_s"] / bare, 3),
            "ratio_pipeline_steady_vs_seed_style": round(piped["steady_images_per_s"] / seed["images_per_s"], 2),
            "ratio_bare_vs_seed_style": round(bare / seed["images_per_s"], 2),
            "mixed_precision": {
                **mixed,
                "ratio_pipeline_steady_vs_seed_style": round(
                    mixed["pipeline"]["steady_images_per_s"] / seed["images_per_s"], 2
                ),
                "ratio_pipeline_end_to_end_2n_vs_bare": round(
                    mixed["pipeline"]["2n"]["end_to_end_images_per_s"] / mixed["bare_model"]["images_per_s"], 3
                ),
                "ratio_bare_vs_float32_bare": round(mixed["bare_model"]["images_per_s"] / bare, 2),
            },
        }

        backbone, size = args.memory_model.split(":")
        small = make_bundle(tmp, backbone, int(size))
        memory = {"model": args.memory_model}
        for label, n in (("n", args.memory_images), ("10n", 10 * args.memory_images)):
            archive = make_archive(tmp / f"archive-{label}", n)
            with PeakRSS() as rss:
                piped = pipeline(small, archive, tmp / f"scored-{label}", args.batch_size)
            memory[label] = {"images": n, **rss.figures(), "end_to_end_images_per_s": piped["end_to_end_images_per_s"]}
            print("memory", label, memory[label], flush=True)
        for key in ("driver_mib", "workers_total_mib", "largest_worker_mib"):
            memory[f"ratio_{key}"] = round(memory["10n"][key] / memory["n"][key], 3)
        out["memory"] = memory
    ray.shutdown()
    out["table"] = speed_table(out["throughput"], None if args.no_table else measure_training_and_serving(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "score_throughput.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out["throughput"].items() if k.startswith("ratio")}, indent=2))
    print(json.dumps({k: v for k, v in out["memory"].items() if k.startswith("ratio")}, indent=2))
    print(json.dumps(out["table"], indent=2))
    print(f"wrote {RESULTS / 'score_throughput.json'}")


if __name__ == "__main__":
    main()
