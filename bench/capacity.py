"""Capacity planning for batch scoring, from the measured figures in bench/results/.

    python bench/capacity.py                           # 10 million OCT scans in 8 hours
    python bench/capacity.py --images 2e6 --hours 4 --gpu-images-per-s 600

Measured (on the 2-vCPU, no-GPU development machine, bench/results/score_throughput.json): VGG16 at
224 px through the whole pipeline, and the decode-bound pipeline with a tiny model. Not measured
(no GPU here): images/s of one GPU, --gpu-images-per-s, an assumption printed as such. Re-run after
re-measuring; the README's capacity section quotes this output.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GPU_NODE_DECODE_VCPUS = 7  # cluster.yaml gpu_1x: 8 vCPUs, one for the model actor
CPU_NODE_VCPUS = 32  # cluster.yaml cpu_decode


def measured() -> dict[str, float]:
    """Per-vCPU rates from the scoring benchmark (2 vCPUs there), the decode rate capped by the
    decode benchmark's OCT-at-224 figure: the scoring benchmark's decode-bound run feeds a 64 px
    model, for which B-scans decode at half scale, while a 224 px model needs the full decode."""
    bench = json.loads((RESULTS / "score_throughput.json").read_text())
    cpus = bench["machine"]["cpus"]
    vgg = bench["throughput"]["pipeline"]["steady_images_per_s"]
    decode = bench["memory"]["10n"]["end_to_end_images_per_s"]  # small_cnn: decode dominates
    decode_per_vcpu = decode / cpus
    speed = RESULTS / "decode_speed.json"
    if speed.exists():
        oct224 = json.loads(speed.read_text())["cases"].get("oct 224")
        if oct224:
            decode_per_vcpu = min(decode_per_vcpu, oct224["full_per_s"])  # one core, full decode + resize
    return {
        "cpus": cpus,
        "vgg16_pipeline": vgg,
        "vgg16_per_vcpu": vgg / cpus,
        "decode_pipeline": decode,
        "decode_per_vcpu": decode_per_vcpu,
    }


def plan(images: float, hours: float, gpu_rate: float, m: dict[str, float]) -> list[str]:
    need = images / (hours * 3600)
    lines = [
        f"required rate: {images:,.0f} images / ({hours:g} h x 3600 s) = {need:,.1f} images/s",
        (
            f"CPU only (measured rate, linear scaling assumed): {need:,.1f} / {m['vgg16_per_vcpu']:.2f} per vCPU "
            f"= {need / m['vgg16_per_vcpu']:,.0f} vCPUs; {images / m['vgg16_per_vcpu'] / 3600:,.0f} vCPU-hours"
        ),
        (
            f"GPU-hours at {gpu_rate:,.0f} images/s per GPU (assumed): {images:,.0f} / ({gpu_rate:,.0f} x 3600) "
            f"= {images / gpu_rate / 3600:,.2f} GPU-hours; GPUs for {hours:g} h: ceil({need:,.1f} / {gpu_rate:,.0f}) "
            f"= {math.ceil(need / gpu_rate)}"
        ),
        (
            f"decode vCPUs at {hours:g} h (measured lower bound {m['decode_per_vcpu']:.1f} images/s per vCPU): "
            f"{need:,.1f} / {m['decode_per_vcpu']:.1f} = {need / m['decode_per_vcpu']:,.1f} vCPUs at most"
        ),
    ]
    for gpus, cpu_nodes in ((1, 0), (2, 0), (4, 0), (1, 1), (2, 1)):
        decode = (gpus * GPU_NODE_DECODE_VCPUS + cpu_nodes * CPU_NODE_VCPUS) * m["decode_per_vcpu"]
        rate = min(gpus * gpu_rate, decode)
        lines.append(
            f"{gpus} x gpu_1x + {cpu_nodes} x cpu_decode: min(GPU {gpus * gpu_rate:,.0f}, decode "
            f"{decode:,.0f}) = {rate:,.0f} images/s -> {images / rate / 3600:,.1f} h"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=float, default=10e6, help="archive size")
    parser.add_argument("--hours", type=float, default=8.0, help="time window")
    parser.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=1000.0,
        help="ASSUMED VGG16@224 images/s of one A10G in the pipeline (not measured here)",
    )
    args = parser.parse_args(argv)
    m = measured()
    print(
        f"measured on {m['cpus']:g} vCPUs: VGG16@224 pipeline {m['vgg16_pipeline']:.2f} images/s "
        f"({m['vgg16_per_vcpu']:.2f} per vCPU); decode {m['decode_per_vcpu']:.1f} images/s per vCPU "
        "(the lower of the decode-bound pipeline and a full decode of OCT for 224 px)"
    )
    print("\n".join(plan(args.images, args.hours, args.gpu_images_per_s, m)))


if __name__ == "__main__":
    main()
