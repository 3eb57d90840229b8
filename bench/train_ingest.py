"""Training throughput fed by Ray Data vs fed by the same tensors from memory.

One Ray Train worker runs the real training step (eyeray.train.distributed) on the same model and
batch size, alternating epochs fed from its Ray Data shard (decoded once, materialized in the
object store, as `eyeray.train` does) and epochs fed from numpy arrays already in the worker's
memory. The ratio of steps per second says what the Ray Data feed costs; it is measured in one
run, interleaved, because this machine is shared and noisy.

    python bench/train_ingest.py                 # writes bench/results/train_ingest.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.train import RunConfig, ScalingConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eyeray.data import synthetic
from eyeray.data.augment import augment_batch  # noqa: E402
from eyeray.data.layouts import read_layout  # noqa: E402
from eyeray.data.records import decode_split  # noqa: E402
from eyeray.tasks import get_task  # noqa: E402
from eyeray.train.worker import train_batches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
    shard = ray.train.get_dataset_shard("train")
    bs = config["batch_size"]

    def ray_batches():
        return train_batches(shard, bs)  # exactly what eyeray.train feeds its workers

    rows = list(shard.iter_batches(batch_size=bs))  # the same tensors, held in memory
    images = np.concatenate([r["image"] for r in rows])
    labels = np.concatenate([r["label"] for r in rows])

    def memory_batches():
        order = np.random.default_rng().permutation(len(images))
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            yield {"image": images[idx], "label": labels[idx]}

    fitter.train_epoch(memory_batches())  # warm-up: tracing, thread pools
    fitter.train_epoch(ray_batches())
    timings = {"ray_data": [], "memory": []}
    for _ in range(config["rounds"]):
        for name, feed in (("ray_data", ray_batches), ("memory", memory_batches)):
            start = time.perf_counter()
            stats = fitter.train_epoch(feed())
            timings[name].append((time.perf_counter() - start, stats.examples))
    steps = -(-len(images) // bs)
    result = {
        name: {
            "steps_per_s": steps * len(t) / sum(s for s, _ in t),
            "images_per_s": sum(n for _, n in t) / sum(s for s, _ in t),
            "epoch_seconds": [round(s, 3) for s, _ in t],
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
    train = decode_split(records, image_size, seed=0).images
    if augment:
        train = train.map_batches(augment_batch, fn_kwargs={"spec": spec.augment}, batch_size=64)
    with tempfile.TemporaryDirectory() as storage:
        trainer = TensorflowTrainer(
            worker_loop,
            train_loop_config={
                "task": args.task,
                "backbone": backbone,
                "image_size": image_size,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "out": str(Path(storage, "figures.json")),
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=storage, name="bench"),
            datasets={"train": train},
        )
        trainer.fit()
        metrics = json.loads(Path(storage, "figures.json").read_text())
    result = metrics["result"]
    ratio = result["ray_data"]["steps_per_s"] / result["memory"]["steps_per_s"]
    row = {
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": args.batch_size,
        "augment": augment,
        "images": metrics["images"],
        "steps_per_epoch": metrics["steps_per_epoch"],
        **result,
        "ratio_ray_data_vs_memory": round(ratio, 3),
    }
    print(
        f"{backbone:>12} @{image_size:<4} augment={str(augment):5} ray_data {result['ray_data']['steps_per_s']:.2f} "
        f"steps/s, memory {result['memory']['steps_per_s']:.2f} steps/s, ratio {ratio:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="oct")
    parser.add_argument("--images-per-class", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved epoch pairs per configuration")
    parser.add_argument("--configs", default="small_cnn:64,mobilenet_v2:96", help="backbone:size,...")
    args = parser.parse_args()
    ray.init()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(synthetic.make_dataset(get_task(args.task), tmp, images_per_class=args.images_per_class, seed=0))
        for item in args.configs.split(","):
            backbone, size = item.split(":")
            for augment in (False, True):
                rows.append(measure(args, backbone, int(size), augment, data))
    out = {
        "benchmark": "train_ingest",
        "what": "training steps/s of one Ray Train worker fed by its Ray Data shard vs by numpy arrays in memory",
        "machine": {"cpus": ray.cluster_resources().get("CPU"), "platform": platform.platform()},
        "target_ratio": 0.9,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_ingest.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'train_ingest.json'}")


if __name__ == "__main__":
    main()
