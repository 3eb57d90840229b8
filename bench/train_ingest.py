"""Training throughput fed by Ray Data vs fed by the same tensors from memory.

One Ray Train worker runs the real training step (eyeray.train.distributed) on the same model and
batch size, alternating epochs fed from its Ray Data shard (decoded once, materialized in the
object store, as `eyeray.train` does) and epochs fed from numpy arrays already in the worker's
memory. The ratio of steps per second says what the Ray Data feed costs; it is measured in one
run, interleaved, because this machine is shared and noisy.

With augmentation there are two Ray Data feeds, eyeray.train's two `--augment-on` sites, both
built by eyeray's own functions: `ray_data_trainer` (the shard's batches augmented in a background
thread of the worker: the default for CPU workers) and `ray_data_tasks` (augmented by
`map_batches(augment_batch)` in Ray Data's CPU tasks: the default with GPUs). The in-memory side
runs two feeds too: `memory_augmented` does the same work in the training loop (the same
`augment_batch` on each batch: the fair comparison, the ratio `vs_same_work`), and `memory` skips it
(`vs_unaugmented_memory`: 1.0 would mean the feed hides the augmentation completely).

`augment_batch_ms` times `augment_batch` in this process on batches of 64 images: the batched numpy
version against the per-image PIL version it replaced (kept here only as the baseline).

    python bench/train_ingest.py                 # writes bench/results/train_ingest.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.train import RunConfig, ScalingConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eyeray.data import synthetic  # noqa: E402
from eyeray.data.augment import augment_batch, training_stream  # noqa: E402
from eyeray.data.layouts import read_layout  # noqa: E402
from eyeray.data.records import decode_split  # noqa: E402
from eyeray.tasks import get_task  # noqa: E402
from eyeray.train.worker import train_batches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RAY_FEEDS = ("ray_data", "ray_data_trainer", "ray_data_tasks")  # the feeds from a Ray Data shard
DEFAULT_FEED = "ray_data_trainer"  # --augment-on auto on CPU workers: the speed table's row


def timed(batches, waits: list[float]):
    """The batches, recording how long the training loop waited for each one."""
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        waits.append(time.perf_counter() - start)
        yield batch


def worker_loop(config: dict) -> None:
    import tensorflow as tf

    from eyeray.model.build import build_model, set_phase
    from eyeray.train.distributed import DistributedFitter

    spec = get_task(config["task"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model(spec, config["backbone"], weights="none", image_size=config["image_size"])
    set_phase(model, "full")
    fitter = DistributedFitter(strategy, model, spec, np.ones(spec.num_classes, np.float32))
    fitter.compile(1e-3)
    shard = ray.train.get_dataset_shard("train")  # not augmented
    bs, augment = config["batch_size"], spec.augment if config["augment"] else None

    rows = list(shard.iter_batches(batch_size=bs))  # the same tensors, held in memory
    images = np.concatenate([r["image"] for r in rows])
    labels = np.concatenate([r["label"] for r in rows])

    def memory_batches():
        order = np.random.default_rng().permutation(len(images))
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            yield {"image": images[idx], "label": labels[idx]}

    def memory_augmented_batches():  # the same work as the Ray Data feeds, done in the training loop
        for batch in memory_batches():
            yield augment_batch(batch, augment)

    # the Ray Data feeds: exactly what eyeray.train feeds its workers (with augmentation, at each --augment-on site)
    if augment:
        tasks_shard = ray.train.get_dataset_shard("train_augmented")
        feeds = {
            "ray_data_trainer": lambda: train_batches(shard, bs, augment),
            "ray_data_tasks": lambda: train_batches(tasks_shard, bs),
            "memory": memory_batches,
            "memory_augmented": memory_augmented_batches,
        }
    else:
        feeds = {"ray_data": lambda: train_batches(shard, bs), "memory": memory_batches}
    fitter.train_epoch(memory_batches())  # warm-up: tracing, thread pools
    for name in RAY_FEEDS:
        if name in feeds:
            fitter.train_epoch(feeds[name]())  # and each Ray Data feed's first execution
    timings = {name: [] for name in feeds}
    for _ in range(config["rounds"]):
        for name, feed in feeds.items():
            waits: list[float] = []
            start = time.perf_counter()
            stats = fitter.train_epoch(timed(feed(), waits))
            timings[name].append((time.perf_counter() - start, stats.examples, waits[0], sum(waits[1:])))
    steps = -(-len(images) // bs)
    result = {
        name: {
            "steps_per_s": steps * len(t) / sum(s for s, *_ in t),
            "images_per_s": sum(n for _, n, *_ in t) / sum(s for s, *_ in t),
            # the epoch less the wait for its first batch (a Ray Data epoch starts its execution then)
            "steady_steps_per_s": (steps - 1) * len(t) / sum(s - first for s, _, first, _ in t),
            "epoch_seconds": [round(s, 3) for s, *_ in t],
            "first_batch_wait_seconds": [round(first, 3) for _, _, first, _ in t],
            "later_batches_wait_seconds": [round(later, 3) for *_, later in t],
        }
        for name, t in timings.items()
    }
    # Train V2 keeps metrics only with a checkpoint: hand the figures back through a file instead.
    Path(config["out"]).write_text(json.dumps({"result": result, "images": int(len(images)), "steps_per_epoch": steps}))


def measure(args, backbone: str, image_size: int, augment: bool, data: str) -> dict:
    from ray.train.tensorflow import TensorflowTrainer

    spec = get_task(args.task)
    layout = read_layout(spec, data)
    records = [r for split in layout.splits.values() for r in split]
    images = decode_split(records, image_size, seed=0).images
    datasets = {"train": training_stream(images, None)}
    if augment:
        datasets["train_augmented"] = training_stream(images, spec.augment)
    with tempfile.TemporaryDirectory() as storage:
        trainer = TensorflowTrainer(
            worker_loop,
            train_loop_config={
                "task": args.task,
                "backbone": backbone,
                "image_size": image_size,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "augment": augment,
                "out": str(Path(storage, "figures.json")),
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=storage, name="bench"),
            datasets=datasets,
        )
        trainer.fit()
        metrics = json.loads(Path(storage, "figures.json").read_text())
    result = metrics["result"]
    same_work = result["memory_augmented" if augment else "memory"]
    ratios = {
        name: {
            "vs_same_work": round(result[name]["steps_per_s"] / same_work["steps_per_s"], 3),
            "steady": round(result[name]["steady_steps_per_s"] / same_work["steady_steps_per_s"], 3),
            "vs_unaugmented_memory": round(result[name]["steps_per_s"] / result["memory"]["steps_per_s"], 3),
        }
        for name in RAY_FEEDS
        if name in result
    }
    default = DEFAULT_FEED if augment else "ray_data"
    row = {
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": args.batch_size,
        "augment": augment,
        "images": metrics["images"],
        "steps_per_epoch": metrics["steps_per_epoch"],
        "feeds": result,
        "ratios": ratios,
        "default_feed": default,
        "ratio_ray_data_vs_memory": ratios[default]["vs_same_work"],
    }
    for name, r in ratios.items():
        print(
            f"{backbone:>12} @{image_size:<4} augment={str(augment):5} {name:<16} "
            f"{result[name]['steps_per_s']:.2f} steps/s, memory (same work) {same_work['steps_per_s']:.2f} steps/s, "
            f"ratio {r['vs_same_work']:.3f}; vs unaugmented memory {r['vs_unaugmented_memory']:.3f}; "
            f"after the first batch {r['steady']:.3f}",
            flush=True,
        )
    return row


def pil_augment_batch(batch: dict[str, np.ndarray], spec) -> dict[str, np.ndarray]:
    """The per-image version `augment_batch` replaced (PIL affine per image): the timing baseline only."""
    from PIL import Image

    rng = np.random.default_rng()

    def one(image: np.ndarray) -> np.ndarray:
        if spec.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        if spec.vflip and rng.random() < 0.5:
            image = image[::-1]
        if spec.rotation_deg or spec.zoom:
            angle = math.radians(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
            scale = rng.uniform(1 - spec.zoom, 1 + spec.zoom)
            h, w = image.shape[:2]
            cx, cy = w / 2, h / 2
            cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
            matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
            img = Image.fromarray(np.ascontiguousarray(image))
            image = np.asarray(img.transform((w, h), Image.AFFINE, matrix, resample=Image.BILINEAR))
        out = image.astype(np.float32)
        if spec.contrast:
            mean = out.mean()
            out = (out - mean) * rng.uniform(1 - spec.contrast, 1 + spec.contrast) + mean
        if spec.brightness:
            out += rng.uniform(-spec.brightness, spec.brightness) * 255.0
        return np.clip(out, 0, 255).astype(np.uint8)

    return {**batch, "image": np.stack([one(img) for img in batch["image"]])}


def augment_timings(task: str, sizes: tuple[int, ...] = (224, 96, 64), batch: int = 64, repeats: int = 15) -> dict:
    """Milliseconds per `map_batches` call of `batch` images, in this process: min and median of `repeats`,
    the two versions alternating call by call so both see the same load (the machine is shared: the
    min, the least disturbed call, is the closest to the cost)."""
    spec = get_task(task).augment
    rng = np.random.default_rng(0)
    versions = {"pil_per_image": pil_augment_batch, "numpy_batched": augment_batch}
    out = {"batch_size": batch, "spec": spec.__dict__, "repeats": repeats, "sizes": {}}
    for size in sizes:
        data = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}
        times: dict[str, list[float]] = {name: [] for name in versions}
        for i in range(repeats + 1):
            for name, fn in versions.items():
                start = time.perf_counter()
                fn(data, spec)
                if i:  # the first call of each: warm-up
                    times[name].append((time.perf_counter() - start) * 1e3)
        row = {name: {"min": round(min(t), 2), "median": round(statistics.median(t), 2)} for name, t in times.items()}
        row["speedup_min"] = round(row["pil_per_image"]["min"] / row["numpy_batched"]["min"], 2)
        row["speedup_median"] = round(row["pil_per_image"]["median"] / row["numpy_batched"]["median"], 2)
        out["sizes"][str(size)] = row
        print(f"augment_batch {batch}x{size}x{size}x3 ms: {row}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="oct")
    parser.add_argument(
        "--images-per-class", type=int, default=250, help="for configs that do not give their own (backbone:size:n)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved epochs of each feed per configuration (epochs of one feed vary by about 15%% on a "
        "shared machine: 10 rounds gave trainer vs tasks an ordering that held in every round)",
    )
    parser.add_argument(
        "--configs",
        default="small_cnn:64,small_cnn:64:1000,mobilenet_v2:96",
        help="backbone:size[:images per class],... (a longer epoch: Ray Data's per-epoch start weighs less)",
    )
    parser.add_argument(
        "--timings-only", action="store_true", help="only measure augment_batch_ms and replace that section of the JSON"
    )
    args = parser.parse_args()
    timings = augment_timings(args.task)
    if args.timings_only:
        path = RESULTS / "train_ingest.json"
        if path.exists():
            previous = json.loads(path.read_text())
            path.write_text(json.dumps({**previous, "augment_batch_ms": timings}, indent=2))
            print(f"updated augment_batch_ms in {path}")
        return
    load_at_start = os.getloadavg()[0]
    ray.init()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data: dict[int, str] = {}
        for item in args.configs.split(","):
            backbone, size, *per_class = item.split(":")
            n = int(per_class[0]) if per_class else args.images_per_class
            if n not in data:
                root = Path(tmp, str(n))
                data[n] = str(synthetic.make_dataset(get_task(args.task), root, images_per_class=n, seed=0))
            for augment in (False, True):
                rows.append(measure(args, backbone, int(size), augment, data[n]))
    out = {
        "benchmark": "train_ingest",
        "what": "training steps/s of one Ray Train worker fed by its Ray Data shard vs by numpy arrays in memory "
        "(augmented in the training loop when the shard is: the same work; see the module docstring)",
        "machine": {
            "cpus": ray.cluster_resources().get("CPU"),
            "platform": platform.platform(),
            # a shared machine: the 1-minute load average says how disturbed the run was
            "load_average_1min": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
        },
        "target_ratio": 0.9,
        "augment_batch_ms": timings,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_ingest.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'train_ingest.json'}")


if __name__ == "__main__":
    main()
