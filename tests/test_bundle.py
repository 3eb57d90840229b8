"""The model bundle: round trip, manifest contents, integrity, atomic publication."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eyeray.model import bundle
from eyeray.model.build import build_model
from eyeray.tasks import get_task


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    spec = get_task("odir")
    model = build_model(spec, "small_cnn", weights="none", image_size=32)
    manifest = bundle.make_manifest(
        spec, model, backbone="small_cnn", image_size=32, weights="none", metrics={"odir_score": 0.5}
    )
    uri = str(tmp_path_factory.mktemp("run") / "bundle")
    return model, bundle.save(model, manifest, uri), uri


def test_round_trip_gives_identical_predictions(saved):
    model, manifest, uri = saved
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    loaded = bundle.load(uri)
    np.testing.assert_array_equal(loaded.predict(images), model.predict(images, verbose=0))
    assert loaded.classes == list("NDGCAHMO") and loaded.image_size == 32 and loaded.spec.multi_label
    bundle.verify(loaded)


def test_test_time_augmentation_is_the_mean_over_the_image_and_its_mirror(saved):
    _, _, uri = saved
    loaded = bundle.load(uri)
    images = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    mirrored = loaded.predict(images[:, :, ::-1])
    np.testing.assert_allclose(loaded.predict(images, tta=True), (loaded.predict(images) + mirrored) / 2, atol=1e-6)
    assert not np.allclose(mirrored, loaded.predict(images))  # the mirror is a different input to this model


def test_manifest_says_what_a_consumer_needs(saved):
    _, manifest, uri = saved
    on_disk = json.loads((Path(uri) / "manifest.json").read_text())
    assert on_disk == manifest
    for key in bundle.REQUIRED_KEYS:
        assert key in on_disk
    assert on_disk["input"] == {
        "name": on_disk["input"]["name"],
        "shape": [32, 32, 3],
        "dtype": "uint8",
        "value_range": [0, 255],
        "channels": ["red", "green", "blue"],
    }
    assert on_disk["thresholds"] == [0.5] * 8
    assert on_disk["version"] == on_disk["model_sha256"][:12]
    assert {"tensorflow", "keras", "eyeray"} <= set(on_disk["libraries"])
    assert "not a medical device" in on_disk["intended_use"].lower()
    assert on_disk["metrics"] == {"odir_score": 0.5}


def test_missing_manifest_and_tampered_model_are_refused(saved, tmp_path):
    _, _, uri = saved
    with pytest.raises(bundle.BundleError, match="no manifest.json"):
        bundle.load(str(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(uri, copy)
    model_file = copy / "model.keras"
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(bundle.BundleError, match="sha256"):
        bundle.load(str(copy))


def test_saving_over_an_existing_bundle_replaces_it_whole(saved, tmp_path):
    model, manifest, _ = saved
    uri = str(tmp_path / "bundle")
    first = bundle.save(model, {k: v for k, v in manifest.items() if k != "version"}, uri)
    (tmp_path / "bundle" / "stale.txt").write_text("from an older run")
    second = bundle.save(model, first, uri)
    assert not (tmp_path / "bundle" / "stale.txt").exists()
    assert bundle.read_manifest(uri)["created_at"] == second["created_at"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging leftovers
