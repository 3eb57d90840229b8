"""Ray Serve load: throughput and latency at 1, 4 and 16 concurrent clients, batched vs unbatched.

Starts a private local Ray instance and the real application (`eyeray.serve.build_app`) on one
bundle, posts the real OCT samples as multipart uploads from N client threads, and repeats with
`max_batch_size` 1 (no batching) and 16. Requests per second, p50/p95/p99 latency and errors go
to bench/results/serve_load.json and a plot beside it. Not a test: the figures depend on the
machine (and this one is shared).

    python bench/serve_load.py [--backbone mobilenet_v2 --image-size 224 --requests 160]
    python bench/serve_load.py --gpus-per-replica 1 --out bench/results/gpu_serve_load.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fixtures import make_archive, make_bundle
from eyeray.serve import ServeArgs, build_app
from tests import samples

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = samples.SAMPLES / "oct-sample"


def load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    """`requests` uploads from `clients` threads; latency per request, wall time for all."""

    def client_loop(worker: int) -> list[tuple[float, int, int]]:
        out = []
        with httpx.Client(timeout=120) as client:
            for i in range(worker, requests, clients):
                start = time.perf_counter()
                r = client.post(f"{url}/v1/oct/predict", files={"file": ("scan", images[i % len(images)])})
                out.append((time.perf_counter() - start, r.status_code, r.json().get("batch_size", 0)))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for rows in pool.map(client_loop, range(clients)) for row in rows]
    wall = time.perf_counter() - start
    latency = np.array([r[0] for r in rows]) * 1000
    ok = [r for r in rows if r[1] == 200]
    return {
        "clients": clients,
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "requests_per_s": round(len(rows) / wall, 2),
        "p50_ms": round(float(np.percentile(latency, 50)), 1),
        "p95_ms": round(float(np.percentile(latency, 95)), 1),
        "p99_ms": round(float(np.percentile(latency, 99)), 1),
        "mean_batch_size": round(float(np.mean([r[2] for r in ok])), 2) if ok else None,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in results["runs"].items():
        clients = [r["clients"] for r in rows]
        ax1.plot(clients, [r["requests_per_s"] for r in rows], marker="o", label=name)
        ax2.plot(clients, [r["p95_ms"] for r in rows], marker="o", label=name)
    for ax, title in ((ax1, "requests / s"), (ax2, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"eyeray serve, {results['backbone']} @ {results['image_size']} px, {results['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=160, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per model replica (as eyeray serve)")
    parser.add_argument("--out", default=str(RESULTS / "serve_load.json"), help="result file (the plot goes beside it)")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Unbatched then batched, each at every client count, on a private Ray instance of its own."""
    tmp = Path(tempfile.mkdtemp(prefix="eyeray-bench-"))
    # The real OCT samples beside the checkout; where they are not (a borrowed machine), generated ones.
    samples = sorted(SAMPLES.rglob("*.jpeg")) or sorted(make_archive(tmp / "archive", 16).glob("*.jpeg"))
    images = [p.read_bytes() for p in samples]
    uri = make_bundle(tmp, args.backbone, args.image_size)
    # A private instance ("local"), never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, _temp_dir=str(tmp / "ray"))
    port = 18000 + (int(time.time()) % 1000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "cpus": args.cpus,
        "gpus_per_replica": args.gpus_per_replica,
        "machine": platform.processor() or platform.machine(),
        "runs": {},
    }
    try:
        for name, batch in (("unbatched", 1), ("batched", 16)):
            app = ServeArgs(
                bundles=[uri],
                max_batch_size=batch,
                cpus_per_replica=1,
                gpus_per_replica=args.gpus_per_replica,
                ingress_cpus=0.5,
                autoscaling={"min_replicas": 1, "max_replicas": 1},
            )
            serve.run(build_app(app), name="bench", route_prefix="/")
            load(url, images, 4, 32)  # warm-up: traces every batch shape the run will see
            results["runs"][name] = [load(url, images, c, args.requests) for c in args.clients]
            for row in results["runs"][name]:
                print(name, json.dumps(row), flush=True)
            serve.delete("bench")  # the next application's replica may need the one GPU this one holds
        at_max = {name: rows[-1]["requests_per_s"] for name, rows in results["runs"].items()}
        results["batched_over_unbatched_at_max_clients"] = round(at_max["batched"] / at_max["unbatched"], 2)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = measure(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"batched / unbatched at {args.clients[-1]} clients: {results['batched_over_unbatched_at_max_clients']}x")
    return results


if __name__ == "__main__":
    main()
