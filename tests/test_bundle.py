"""The model bundle: round trip, manifest contents, integrity, atomic publication."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from corpus import gradient
from PIL import Image

from eyeray.data import imaging
from eyeray.model import bundle
from eyeray.model import manifest as schema
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


def _rewrite(uri: str, dest: Path, change) -> str:
    """A copy of the bundle at `dest` whose manifest.json `change(manifest)` edited (same model file)."""
    shutil.copytree(uri, dest)
    path = dest / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return str(dest)


def test_manifest_preprocessing_is_machine_readable_and_round_trips(saved):
    _, manifest, uri = saved
    assert manifest["format_version"] == bundle.FORMAT_VERSION == 2
    assert manifest["preprocessing"] == {
        "decode": {
            "formats": ["jpeg", "png", "tiff", "bmp", "dicom"],
            "colour": "rgb",
            "greyscale": "replicate",
            "high_bit_depth": "min-max",
        },
        "resize": {"size": [32, 32], "method": "bilinear", "keep_aspect": False},
        "max_pixels": imaging.DEFAULT_MAX_PIXELS,
        "normalise": "in-model: eyeray.model.build.BackbonePreprocess (small_cnn)",
    }
    read = bundle.read_manifest(uri)
    assert schema.validate(read) == read  # the checked form is stable
    assert {k: read[k] for k in manifest} == manifest  # nothing written is lost or changed on reading
    required = "format_version version task classes multi_label backbone input preprocessing thresholds model_file"
    assert set(bundle.REQUIRED_KEYS) == {*required.split(), "model_sha256", "created_at", "libraries"}  # as in format 1
    loaded = bundle.load(uri)
    assert (loaded.image_size, loaded.resize_method, loaded.max_pixels) == (32, "bilinear", imaging.DEFAULT_MAX_PIXELS)


def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_field(saved, tmp_path):
    _, _, uri = saved

    def big(m):
        m["input"]["shape"] = "big"

    with pytest.raises(bundle.BundleError, match=r"manifest.json: input.shape: Input should be a valid tuple"):
        bundle.load(_rewrite(uri, tmp_path / "big", big))

    def several(m):
        m["preprocessing"]["resize"]["method"] = "fancy"
        m["thresholds"] = [0.5]
        del m["model_sha256"]

    with pytest.raises(bundle.BundleError) as info:
        bundle.read_manifest(_rewrite(uri, tmp_path / "several", several))
    message = str(info.value)
    assert "preprocessing.resize.method: unknown resize method 'fancy'; one of nearest, bilinear" in message
    assert "thresholds: 1 thresholds for 8 classes" in message and "model_sha256: missing" in message

    def mismatch(m):
        m["preprocessing"]["resize"]["size"] = [64, 64]

    with pytest.raises(bundle.BundleError, match=r"preprocessing: resize.size \[64, 64\] is not input.shape's"):
        bundle.read_manifest(_rewrite(uri, tmp_path / "mismatch", mismatch))

    def overcertified(m):
        certified = {"metric": "sensitivity", "confidence": 0.95, "method": "m", "bound": 0.9, "successes": 35}
        certified.update(trials=34, meets_target=False, statement="s")
        m["operating_point"] = {"rule": "referral_sensitivity", "threshold": 0.4, "certified": certified}

    with pytest.raises(bundle.BundleError, match=r"operating_point: .*35 successes of 34 trials"):
        bundle.read_manifest(_rewrite(uri, tmp_path / "overcertified", overcertified))
    with pytest.raises(bundle.BundleError, match="format 3 is newer than this eyeray reads"):
        bundle.read_manifest(_rewrite(uri, tmp_path / "newer", lambda m: m.update(format_version=3)))
    (tmp_path / "newer" / "manifest.json").write_text("{not json")
    with pytest.raises(bundle.BundleError, match="not JSON"):
        bundle.read_manifest(str(tmp_path / "newer"))


def test_a_newer_writers_extra_keys_pass_through(saved, tmp_path):
    _, _, uri = saved

    def extra(m):
        m["provenance"] = {"site": "A"}
        m["preprocessing"]["resize"]["antialias"] = True

    read = bundle.read_manifest(_rewrite(uri, tmp_path / "extra", extra))
    assert read["provenance"] == {"site": "A"} and read["preprocessing"]["resize"]["antialias"] is True


def test_save_refuses_an_invalid_manifest_and_leaves_nothing(saved, tmp_path):
    model, manifest, _ = saved
    with pytest.raises(bundle.BundleError, match=r"thresholds: 2 thresholds for 8 classes"):
        bundle.save(model, {**manifest, "thresholds": [0.5, 0.5]}, str(tmp_path / "bundle"))
    assert not (tmp_path / "bundle").exists()


def test_a_format_1_bundle_still_loads_with_the_preprocessing_it_described(saved, tmp_path):
    """Format 1 (before structured preprocessing) wrote prose, and no calibration or operating point."""
    _, _, uri = saved

    def format_1(m):
        m["format_version"] = 1
        m["preprocessing"] = {
            "decode": "eyeray.imaging.decode: JPEG/PNG/TIFF/BMP/DICOM -> RGB uint8; greyscale replicated, "
            ">8-bit min-max scaled",
            "resize": "eyeray.imaging.preprocess: bilinear to 32x32, aspect ratio not kept",
            "normalise": "inside the model: eyeray.models.BackbonePreprocess (the backbone's keras.applications "
            "preprocess_input)",
            "max_pixels": 64000000,
        }
        m["decision"] = "per-label probability >= threshold"
        for key in ("calibration", "operating_point", "activation", "positive_class"):
            del m[key]

    old = bundle.load(_rewrite(uri, tmp_path / "v1", format_1))
    assert old.manifest["format_version"] == 1
    assert old.manifest["preprocessing"]["resize"] == {"size": [32, 32], "method": "bilinear", "keep_aspect": False}
    assert old.manifest["preprocessing"]["max_pixels"] == imaging.DEFAULT_MAX_PIXELS
    assert old.manifest["calibration"] == {"method": "none"} and old.manifest["operating_point"] is None
    images = np.random.default_rng(2).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(old.predict(images), bundle.load(uri).predict(images))
    assert old.decide(old.predict(images)).labels is not None


def test_scoring_decodes_with_the_manifests_preprocessing(saved, tmp_path):
    """The batch scorer's decode stage (`decode_options` -> `imaging.load_batch`) applies the
    manifest's resize size, method and max_pixels; bundles that resize differently are refused."""
    from eyeray.score.pipeline import decode_options

    _, _, uri = saved

    def nearest(m):
        m["preprocessing"]["resize"]["method"] = "nearest"
        m["preprocessing"]["max_pixels"] = 1000

    manifest = bundle.read_manifest(_rewrite(uri, tmp_path / "nearest", nearest))
    options = decode_options([manifest])
    assert options == {"size": 32, "extra_sizes": (), "method": "nearest", "max_pixels": 1000}
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.fromarray(gradient(20, 30)).save(small)
    Image.fromarray(gradient(40, 60)).save(large)  # 2400 pixels: over this bundle's limit
    out = imaging.load_batch({"path": np.array([str(small), str(large)], dtype=object)}, **options)
    np.testing.assert_array_equal(out["image"][0], imaging.preprocess(gradient(20, 30), 32, "nearest"))
    assert out["error"][0] == "" and "too large" in out["error"][1] and "limit 1000" in out["error"][1]
    with pytest.raises(ValueError, match="bundles resize differently"):
        decode_options([manifest, bundle.read_manifest(uri)])
