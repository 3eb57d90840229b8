"""Fail fast: every setting the driver can check is checked before Ray starts, and a wrong one
ends the command with status 2 and one line that names the flag (issue 14, item 3).

Real files, no mocks, no Ray cluster: each refused command must leave Ray unstarted."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from bundles import make_bundle
from conftest import free_port

from eyeray.cli import main, score_main, sweep_main, train_main
from eyeray.model.build import BACKBONES
from eyeray.preflight import SettingError, check_writable
from eyeray.train import TrainConfig
from eyeray.train import preflight as train_preflight

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Backbone weights files saved with weights=None at 32 px (VGG16's and MobileNetV2's)."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("vgg16", "mobilenet_v2"):
        files[name] = str(folder / f"{name}.weights.h5")
        BACKBONES[name].build((32, 32, 3), None).save_weights(files[name])
    return files


def refused(capsys, entry, argv: list[str]) -> str:
    """Run an entry point in-process; it must return 2 with one stderr line, and not start Ray."""
    started = ray.is_initialized()
    assert entry(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eyeray: error: "), err
    assert "Traceback" not in err[0]
    assert ray.is_initialized() == started, "a refused command started Ray"
    return err[0]


def train(capsys, *argv: str) -> str:
    return refused(capsys, lambda a: train_main("glaucoma", a), list(argv))


def test_image_size_below_the_backbones_minimum(capsys, glaucoma_sample, tmp_path):
    line = train(capsys, "--data", str(glaucoma_sample), "--image-size", "64", "--output", str(tmp_path / "o"))
    assert line == (
        "eyeray: error: --image-size 64 is too small for xception (needs at least 71); "
        "use --image-size 299 (the task's default) or another --backbone"
    )
    line = train(capsys, "--backbone", "vgg16+inception_resnet_v2", "--image-size", "40", "--output", str(tmp_path))
    assert "too small for vgg16+inception_resnet_v2 (inception_resnet_v2) (needs at least 75)" in line


def test_the_minimum_sizes_are_what_the_backbones_need():
    """BACKBONES' min_size is the one table: each backbone refuses one pixel less (Keras' own check
    for the applications; small_cnn's four poolings), and small_cnn builds at its minimum."""
    for name, info in BACKBONES.items():
        below = info.min_size - 1
        with pytest.raises(ValueError):
            info.build((below, below, 3), None)
            pytest.fail(f"{name} builds at {below} px, below its min_size")
    BACKBONES["small_cnn"].build((16, 16, 3), None)


def test_weights_of_another_backbone_are_refused(capsys, glaucoma_sample, weights, tmp_path):
    start = time.perf_counter()
    line = train(
        capsys,
        *("--data", str(glaucoma_sample), "--backbone", "vgg16", "--image-size", "32"),
        *("--weights", weights["mobilenet_v2"], "--output", str(tmp_path / "o")),
    )
    assert f"--weights {weights['mobilenet_v2']} does not load into vgg16 (A total of 13 objects" in line
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "o").exists()  # the output probe leaves nothing behind


def test_matching_weights_and_good_settings_pass(glaucoma_sample, weights, tmp_path):
    cfg = TrainConfig(
        task="glaucoma",
        data=str(glaucoma_sample),
        backbone="vgg16",
        weights=weights["vgg16"],
        image_size=48,  # another size than the file's: conv weights do not depend on it
        output=str(tmp_path / "new" / "run"),
    )
    started = ray.is_initialized()  # the session cluster, when a module before this one used it
    assert train_preflight.check(cfg).output == cfg.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "new" / "run" / "ray_train").mkdir(parents=True)
    train_preflight.check(dataclasses.replace(cfg, resume=True))  # --resume continues it
    assert ray.is_initialized() == started, "a preflight check started Ray"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--weights", "MISSING"], "--weights MISSING does not exist"),
        (["--backbone", "small_cnn"], "--weights imagenet: small_cnn has no ImageNet weights"),
        (["--backbone", "xception+vgg16", "--weights", "W"], "--weights W loads one backbone, not the ensemble"),
        (["--backbone", "resnet9"], "--backbone: unknown backbone 'resnet9'"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "--val-fraction/--test-fraction: val_fraction=0.6"),
    ],
)
def test_other_backbone_and_weights_settings(capsys, glaucoma_sample, tmp_path, argv, expected):
    argv = [a.replace("MISSING", str(tmp_path / "none.weights.h5")) for a in argv]
    expected = expected.replace("MISSING", str(tmp_path / "none.weights.h5"))
    line = train(capsys, "--data", str(glaucoma_sample), *argv, "--output", str(tmp_path / "o"))
    assert expected in line


def test_unreadable_data(capsys, tmp_path):
    missing = tmp_path / "missing"
    line = train(capsys, "--data", str(missing), "--output", str(tmp_path / "o"))
    assert line.startswith(f"eyeray: error: --data {missing}: not a folder, or it does not exist. Expected EyePACS")
    no_classes = tmp_path / "downloads"
    (no_classes / "misc").mkdir(parents=True)
    (no_classes / "readme.txt").write_text("hello")
    (no_classes / "other").mkdir()
    line = train(capsys, "--data", str(no_classes), "--output", str(tmp_path / "o"))
    assert f"--data {no_classes}: no dataset found. Expected EyePACS" in line
    assert "Found: 'misc/', 'other/', 'readme.txt'" in line


def test_an_output_that_cannot_be_written_or_holds_a_run(capsys, glaucoma_sample, tmp_path):
    data = ("--data", str(glaucoma_sample))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert train(capsys, *data, "--output", str(a_file)).endswith(f"--output {a_file} is a file; choose a folder")
    line = train(capsys, *data, "--output", str(a_file / "run"))
    assert line.endswith(f"--output {a_file / 'run'} is inside {a_file}, which is a file; choose a folder")
    line = train(capsys, *data, "--output", "/proc/eyeray-run")  # not writable, even for root
    assert line.startswith("eyeray: error: --output /proc/eyeray-run is not writable (")
    (tmp_path / "old" / "ray_train").mkdir(parents=True)
    line = train(capsys, *data, "--output", str(tmp_path / "old"))
    assert line == (
        f"eyeray: error: --output {tmp_path / 'old'} already holds a training run; pass --resume to continue it, "
        "or choose another --output"
    )


def test_an_existing_run_is_still_a_file_exists_error_for_python_callers(glaucoma_sample, tmp_path):
    (tmp_path / "ray_train").mkdir()
    cfg = TrainConfig(task="glaucoma", data=str(glaucoma_sample), output=str(tmp_path))
    with pytest.raises(FileExistsError, match="--resume"):
        train_preflight.check(cfg)
    with pytest.raises(SettingError):
        train_preflight.check(cfg)


@pytest.mark.parametrize("setting", [{"augment_on": "gpu"}, {"mixed_dtype": "float8"}])
def test_python_callers_get_the_flags_choices_checked_too(glaucoma_sample, tmp_path, setting):
    ((name, value),) = setting.items()
    cfg = TrainConfig(task="glaucoma", data=str(glaucoma_sample), output=str(tmp_path / "o"), **setting)
    with pytest.raises(SettingError, match=f"^--{name.replace('_', '-')} must be one of auto, .+, not '{value}'$"):
        train_preflight.check(cfg)


def test_writable_probe_on_an_existing_folder_leaves_it_as_it_was(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    check_writable(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_verbose_shows_the_traceback_too(capsys, glaucoma_sample, tmp_path):
    argv = ["train", "glaucoma", "--data", str(glaucoma_sample), "--image-size", "8", "--output", str(tmp_path)]
    assert main([*argv, "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "SettingError" in err
    assert err.strip().splitlines()[-1].startswith("eyeray: error: --image-size 8 is too small")


def test_scoring_with_a_missing_bundle_or_input(capsys, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    line = refused(
        capsys,
        score_main,
        ["--bundle", str(tmp_path / "nobundle"), "--input", str(archive), "--output", str(tmp_path / "o")],
    )
    assert line.startswith(f"eyeray: error: --bundle {tmp_path / 'nobundle'} is not a model bundle: no manifest.json")
    bundle = make_bundle(tmp_path / "bundle")
    line = refused(
        capsys, score_main, ["--bundle", bundle, "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]
    )
    assert line.startswith(f"eyeray: error: --input {tmp_path / 'nothing'} does not exist")
    line = refused(capsys, score_main, ["--bundle", bundle, "--input", str(archive), "--output", "/proc/scores"])
    assert line.startswith("eyeray: error: --output /proc/scores is not writable")
    # config validation (ScoreConfig) is a setting too
    line = refused(capsys, score_main, ["--bundle", bundle, "--input", str(archive), "--output", "o", "--actors", "0"])
    assert line == "eyeray: error: actors must be at least 1, not 0"
    # a PACS: listing it is the check; one that does not answer, or a PACS flag without one, is one line
    closed = free_port()
    pacs = f"http://127.0.0.1:{closed}/dicom-web"
    line = refused(capsys, score_main, ["--bundle", bundle, "--input", pacs, "--output", str(tmp_path / "o")])
    assert line == (
        f"eyeray: error: --input PACS {pacs} unreachable for the QIDO-RS instance search: connection refused"
    )
    line = refused(
        capsys, score_main, ["--bundle", bundle, "--input", str(archive), "--output", "o", "--modality", "OPT"]
    )
    assert (
        line
        == "eyeray: error: --study-date, --modality and --write-back need a DICOMweb --input (http(s)://.../dicom-web)"
    )


def test_sweep_data_and_output(capsys, glaucoma_sample, tmp_path):
    line = refused(capsys, sweep_main, ["--task", "glaucoma", "--data", str(tmp_path / "x"), "--output", str(tmp_path)])
    assert f"--data {tmp_path / 'x'}: not a folder" in line
    a_file = tmp_path / "f"
    a_file.write_text("x")
    line = refused(capsys, sweep_main, ["--task", "glaucoma", "--data", str(glaucoma_sample), "--output", str(a_file)])
    assert line.endswith("is a file; choose a folder")
    line = refused(capsys, sweep_main, ["--trials", "0", "--output", str(tmp_path)])  # SweepConfig.check
    assert line == "eyeray: error: --trials must be at least 1, not 0"
    (tmp_path / "old" / "tune").mkdir(parents=True)
    (tmp_path / "old" / "tune" / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    line = refused(capsys, sweep_main, ["--output", str(tmp_path / "old")])
    assert line.endswith("already holds a sweep; pass --resume to continue it, or choose another --output")


def test_a_job_script_fails_in_seconds_with_one_line(glaucoma_sample, tmp_path):
    """The issue's example, as users run it: no Ray start, no worker traceback, exit status 2."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_ADDRESS": ""}
    argv = ["--data", str(glaucoma_sample), "--image-size", "64", "--output", str(tmp_path / "o")]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "jobs/train_glaucoma.py", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    # TensorFlow's own start-up lines (absl, oneDNN) may come before; nothing else does
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("eyeray", "Traceback")) or "Error" in line]
    assert errors == [
        "eyeray: error: --image-size 64 is too small for xception (needs at least 71); "
        "use --image-size 299 (the task's default) or another --backbone"
    ]
    assert "Ray" not in proc.stdout + proc.stderr  # "Started a local Ray instance" never appears
    assert took < 120, f"took {took:.0f}s"  # imports (TensorFlow, Ray) are most of it: ~10 s here
    assert not (tmp_path / "o").exists()


def test_s3_weights_and_output(capsys, s3_server, glaucoma_sample, weights, tmp_path):
    """The same checks on s3:// (moto's S3 server): a weights file is fetched and loaded, an output
    bucket is probed and left as it was, a missing bucket or file is refused."""
    from eyeray import storage

    fs, _ = storage.filesystem("s3://preflight")
    fs.mkdir("preflight")
    fs.put(weights["vgg16"], "preflight/vgg16.weights.h5")
    train_preflight.check_weights_file("vgg16", 32, "s3://preflight/vgg16.weights.h5")
    check_writable("s3://preflight/runs/one")
    fs.invalidate_cache()
    assert fs.ls("preflight") == ["preflight/vgg16.weights.h5"]
    with pytest.raises(SettingError, match=r"^--output s3://no-such-bucket/run is not writable \(.+\); choose"):
        check_writable("s3://no-such-bucket/run")
    line = train(
        capsys,
        *("--data", str(glaucoma_sample), "--backbone", "mobilenet_v2", "--image-size", "32"),
        *("--weights", "s3://preflight/vgg16.weights.h5", "--output", str(tmp_path / "o")),
    )
    assert "--weights s3://preflight/vgg16.weights.h5 does not load into mobilenet_v2" in line
    line = train(capsys, "--data", str(glaucoma_sample), "--weights", "s3://preflight/x.h5", "--output", str(tmp_path))
    assert "--weights s3://preflight/x.h5 does not exist" in line


@pytest.mark.parametrize("confidence", [0.3, 1.0, -0.1])
def test_threshold_confidence_is_zero_or_a_confidence(glaucoma_sample, tmp_path, confidence):
    cfg = TrainConfig(task="glaucoma", data=str(glaucoma_sample), output=str(tmp_path / "o"))
    with pytest.raises(SettingError, match=f"^--threshold-confidence must be 0 .+, not {confidence}$"):
        train_preflight.check(dataclasses.replace(cfg, threshold_confidence=confidence))
