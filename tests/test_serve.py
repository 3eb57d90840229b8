"""Ray Serve on the session's cluster: the same answers as batch scoring, 4xx for every bad request,
batching under load, auth, metrics, autoscaling, a killed replica replaced, the shipped config."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from bundles import drawn, gated_task_bundles, make_bundle, with_gate
from conftest import free_port
from corpus import make_oct_volume, real_bscans
from PIL import Image, ImageDraw
from test_imaging import make_dicom, tiff_with_a_page_without_dimensions

from eyeray.data import imaging
from eyeray.model import bundle
from eyeray.model.options import InferenceOptions
from eyeray.serve import ServeArgs, build_app
from eyeray.serve.ingress import read_token
from eyeray.tasks import get_task

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
APP = "eyeray-test"
FAST = {"cpus_per_replica": 0.1, "ingress_cpus": 0.1}  # 2 CPUs for every replica of the module
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, str]:
    """A tiny untrained bundle per task (small_cnn at 32 px) with a fitted calibration and operating
    point: seconds to make, real Keras models, the calibrated decision path."""
    return {
        task: make_bundle(tmp_path_factory.mktemp(task), task, decision=True) for task in ("oct", "glaucoma", "odir")
    }


@pytest.fixture(scope="module")
def url(ray_cluster, bundles, tmp_path_factory):
    """One Serve instance for the module: the three tasks in one application, each model replica
    holding half a (logical) GPU, so the num_gpus path runs on this CPU machine, and a bearer token
    read from a file (the other applications of the module run without one)."""
    from ray import serve

    token = tmp_path_factory.mktemp("secret") / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(
        bundles=list(bundles.values()),
        gpus_per_replica=0.5,
        max_body_bytes=2**20,
        batch_wait_timeout_s=0.05,
        autoscaling={"min_replicas": 1, "max_replicas": 1},
        ingress_env={"EYERAY_API_TOKEN_FILE": str(token)},
        **FAST,
    )
    serve.run(build_app(args), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def api_client(timeout: float = 60) -> httpx.Client:
    """An HTTP client of the module's application (it sends the token)."""
    return httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"})


def predict(client: httpx.Client, base: str, task: str, data: bytes, *, raw: bool = False, **kwargs) -> httpx.Response:
    if raw:
        headers = {"Content-Type": "application/octet-stream", **kwargs.pop("headers", {})}
        return client.post(f"{base}/v1/{task}/predict", content=data, headers=headers, **kwargs)
    return client.post(f"{base}/v1/{task}/predict", files={"file": ("scan", data)}, **kwargs)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def generated_images() -> dict[str, bytes]:
    """Every input kind decode handles besides the real JPEGs: 16-bit, greyscale, RGBA, TIFF, BMP, DICOM."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), np.uint8)
    return {
        "gen-16bit.png": encode(Image.fromarray(rng.integers(0, 4096, (40, 50)).astype(np.uint16)), "PNG"),
        "gen-grey.png": encode(Image.fromarray(rgb[:, :, 0]), "PNG"),
        "gen-rgba.png": encode(Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])), "PNG"),
        "gen.tiff": encode(Image.fromarray(rgb), "TIFF"),
        "gen.bmp": encode(Image.fromarray(rgb), "BMP"),
        "gen.jpg": encode(Image.fromarray(rgb), "JPEG"),
        "gen.dcm": make_dicom(rng.integers(0, 4096, (30, 40))),
    }


def batch_scores(bundle_uri: str, archive: Path, out: Path) -> dict[str, dict]:
    """The batch scorer's rows for `archive`, by file name."""
    from eyeray.score import ScoreConfig, run

    # The module's Serve application holds 0.4 of the cluster's 2 CPUs: a half-CPU model actor fits.
    run(ScoreConfig(bundles=[bundle_uri], input=str(archive), output=str(out), cpus_per_actor=0.5))
    rows = pads.dataset(str(out), format="parquet", exclude_invalid_files=True).to_table().to_pylist()
    return {r["path"].rsplit("/", 1)[-1]: r for r in rows}


def assert_same(answer: dict, row: dict, name: str) -> None:
    assert row["status"] == answer["status"] == "ok", name
    assert answer["gate"]["verdict"] == row["gate"] == "no gate", name  # these bundles were made without one
    assert answer["bundle_version"] == row["bundle_version"], name
    labels = row["label"] if isinstance(row["label"], list) else [row["label"]]
    assert answer["labels"] == labels, name
    classes = list(row["probabilities"])
    np.testing.assert_allclose(
        [answer["probabilities"][c] for c in classes],
        [row["probabilities"][c] for c in classes],
        atol=1e-5,
        err_msg=name,
    )
    assert (answer["referral"], answer["needs_review"]) == (row["referral"], row["needs_review"]), name
    assert answer["confidence"] == pytest.approx(row["confidence"], abs=1e-5), name
    assert answer["operating_point"] == json.loads(row["decision"])["operating_point"], name


def test_answers_equal_batch_scoring(url, bundles, oct_sample, odir_sample, tmp_path):
    """No train/serve skew: every real OCT sample, every generated input kind and real ODIR fundus
    photographs (multi-label) get the labels and probabilities the batch scorer writes for the same files."""
    archive = tmp_path / "oct"
    shutil.copytree(oct_sample, archive)
    for name, data in generated_images().items():
        (archive / name).write_bytes(data)
    odir = tmp_path / "odir"
    odir.mkdir()
    for path in sorted((odir_sample / "images").iterdir())[:30]:
        shutil.copy(path, odir)
    cases = [("oct", p) for p in sorted(archive.rglob("*")) if p.is_file()]
    cases += [("odir", p) for p in sorted(odir.iterdir())]

    with api_client() as client, ThreadPoolExecutor(8) as pool:
        # Half as multipart uploads, half as raw bodies: both are the same bytes to decode.
        answers = list(
            pool.map(
                lambda i: predict(client, url, cases[i][0], cases[i][1].read_bytes(), raw=i % 2 == 1), range(len(cases))
            )
        )
    assert [r.status_code for r in answers] == [200] * len(cases), [r.text for r in answers if r.status_code != 200]
    expected = {
        "oct": batch_scores(bundles["oct"], archive, tmp_path / "oct-scores"),
        "odir": batch_scores(bundles["odir"], odir, tmp_path / "odir-scores"),
    }
    for (task, path), response in zip(cases, answers):
        answer = response.json()
        assert answer["task"] == task
        assert_same(answer, expected[task][path.name], path.name)
    oct_answer = answers[0].json()
    assert oct_answer["label"] == oct_answer["labels"][0]
    assert oct_answer["referral"] == (oct_answer["label"] in ("CNV", "DME"))
    odir_answer = answers[-1].json()
    assert odir_answer["label"] is None and odir_answer["referral"] is None  # multi-label, no referral rule
    assert odir_answer["operating_point"]["rule"] == "per_label_f1"  # thresholds chosen per label, not a flat 0.5
    raw = bundle.load(bundles["oct"]).predict(imaging.preprocess(imaging.decode(cases[0][1].read_bytes()), 32)[None])
    assert not np.allclose(list(oct_answer["probabilities"].values()), raw[0], atol=1e-3)  # calibrated numbers


def test_tasks_routed_models_listed_and_docs(url, bundles, glaucoma_sample):
    with api_client() as client:
        assert client.get(f"{url}/healthz").json() == {"status": "ok", "tasks": ["glaucoma", "oct", "odir"]}
        models = {m["task"]: m["manifest"] for m in client.get(f"{url}/v1/models").json()["models"]}
        assert {t: m["version"] for t, m in models.items()} == {
            t: bundle.read_manifest(u)["version"] for t, u in bundles.items()
        }
        assert models["oct"]["classes"] == ["CNV", "DME", "DRUSEN", "NORMAL"]
        image = next((glaucoma_sample / "RG").iterdir()).read_bytes()
        answer = predict(client, url, "glaucoma", image).json()
        assert answer["task"] == "glaucoma" and set(answer["probabilities"]) == {"NRG", "RG"}
        assert answer["referral"] == (answer["label"] == "RG")
        assert client.get(f"{url}/docs").status_code == 200
        spec = client.get(f"{url}/openapi.json").json()
        upload = spec["paths"]["/v1/oct/predict"]["post"]["requestBody"]["content"]
        assert "multipart/form-data" in upload and "image/*" in upload


def test_explain_returns_the_prediction_and_an_overlay_at_the_uploads_size(url, bundles, oct_sample):
    scan = sorted((oct_sample / "DME").iterdir())[0]
    with api_client() as client:
        predicted = predict(client, url, "oct", scan.read_bytes()).json()
        response = client.post(f"{url}/v1/oct/explain", files={"file": ("scan", scan.read_bytes())})
        assert response.status_code == 200, response.text
        answer = response.json()
        for key in ("labels", "referral", "needs_review", "operating_point", "bundle_version"):
            assert answer[key] == predicted[key], key
        # explain's probabilities come from the Grad-CAM forward pass (one image, another graph) and
        # predict's from the compiled batched model: float32 kernels differ by ~1e-5 (1.4e-5 seen in CI)
        assert answer["confidence"] == pytest.approx(predicted["confidence"], abs=1e-4)
        assert answer["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-4)
        assert answer["explained_class"] == answer["label"]
        overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
        assert overlay.format == "PNG" and overlay.size == Image.open(scan).size

        chosen = client.post(
            f"{url}/v1/oct/explain",
            params={"class": "NORMAL", "thresholds": "0"},
            files={"file": ("scan", scan.read_bytes())},
        ).json()
        assert chosen["explained_class"] == "NORMAL" and chosen["referral"] is True
        assert chosen["operating_point"] == {
            **predicted["operating_point"],
            "threshold": 0.0,
            "chosen_on": "user override",
        }
        everyone = predict(client, url, "oct", scan.read_bytes(), params={"thresholds": "0"}).json()
        assert everyone["referral"] is True and everyone["label"] in ("CNV", "DME")
        rejected = {
            "unknown class": client.post(f"{url}/v1/oct/explain", params={"class": "RG"}, files={"file": ("s", b"x")}),
            "two thresholds for one rule": predict(
                client, url, "oct", scan.read_bytes(), params={"thresholds": "0.1,0.2"}
            ),
            "unknown label": predict(client, url, "odir", scan.read_bytes(), params={"thresholds": "Z=0.3"}),
            "not a number": predict(client, url, "glaucoma", scan.read_bytes(), params={"thresholds": "high"}),
        }
        for name, r in rejected.items():
            assert r.status_code == 422 and r.json()["detail"], (name, r.text)
        labels = predict(client, url, "odir", scan.read_bytes(), params={"thresholds": "D=0,G=1"}).json()
        assert "D" in labels["labels"] and "G" not in labels["labels"]


def bad_requests(sample: bytes) -> dict[str, tuple[int, dict]]:
    """name -> (expected status, httpx.post keyword arguments after the URL)."""
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # 400 MP, ~50 KB on the wire
    dicom = make_dicom(np.ones((16, 16)) * 100)
    octet = {"Content-Type": "application/octet-stream"}
    return {
        "not an image": (422, {"content": b"just some text, not pixels", "headers": {"Content-Type": "image/jpeg"}}),
        "random bytes": (422, {"files": {"file": ("x.png", np.random.default_rng(1).bytes(5000))}}),
        "truncated jpeg": (422, {"content": sample[: len(sample) // 3], "headers": octet}),
        "truncated dicom": (422, {"content": dicom[:-200], "headers": {"Content-Type": "application/dicom"}}),
        "decompression bomb": (422, {"files": {"file": ("bomb.png", bomb)}}),
        "empty body": (400, {"content": b"", "headers": octet}),
        "empty file field": (400, {"files": {"file": ("scan.jpeg", b"")}}),
        "no file field": (400, {"data": {"image": "scan.jpeg"}, "files": {"other": ("a", b"x")}}),
        "multipart, no boundary": (400, {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}}),
        "json body": (415, {"json": {"image": "base64..."}}),
        "form body": (415, {"data": {"file": "scan.jpeg"}}),
        "text body": (415, {"content": b"hello", "headers": {"Content-Type": "text/plain"}}),
        "oversized raw body": (413, {"content": b"\xff" * (2**20 + 1), "headers": octet}),
        "oversized upload": (413, {"files": {"file": ("big.jpeg", sample + b"\0" * 2**20)}}),
        "oversized, no Content-Length": (413, {"content": iter([b"\0" * 2**19] * 3), "headers": octet}),
    }


def test_bad_requests_get_4xx_with_a_reason_and_the_service_stays_up(url, oct_sample):
    sample = next((oct_sample / "CNV").iterdir()).read_bytes()
    with api_client() as client:
        for name, (status, kwargs) in bad_requests(sample).items():
            try:
                response = client.post(f"{url}/v1/oct/predict", **kwargs)
            except httpx.TransportError as exc:  # only acceptable if the server answered first
                pytest.fail(f"{name}: {exc!r}")
            assert response.status_code == status, (name, response.status_code, response.text)
            assert isinstance(response.json()["detail"], str) and response.json()["detail"], name
        for method, path, status in (
            ("POST", "/v1/retina/predict", 404),
            ("GET", "/v1/oct/predict", 405),
            ("POST", "/v1/ODIR/predict", 404),
        ):
            response = client.request(method, f"{url}{path}", content=sample)
            assert response.status_code == status and response.json()["detail"], (path, response.text)
        assert "retina" in client.post(f"{url}/v1/retina/predict", content=sample).json()["detail"]
        for params, words in (({"alpha": "2"}, "query alpha: "), ({"class": ""}, "query class: ")):
            response = client.post(f"{url}/v1/oct/explain", params=params, files={"file": ("s", sample)})
            assert response.status_code == 422 and response.json()["detail"].startswith(words), response.text
        assert client.get(f"{url}/healthz").json()["status"] == "ok"
        answer = predict(client, url, "oct", sample)
        assert answer.status_code == 200 and answer.json()["label"] in get_task("oct").classes


def test_200_requests_from_16_clients_are_batched(url, oct_sample):
    images = [p.read_bytes() for p in sorted(oct_sample.rglob("*.jpeg"))]

    def client_loop(worker: int) -> list[httpx.Response]:
        with api_client(120) as client:
            return [predict(client, url, "oct", images[(worker * 13 + i) % len(images)]) for i in range(200 // 16 + 1)]

    with ThreadPoolExecutor(16) as pool:
        responses = [r for rs in pool.map(client_loop, range(16)) for r in rs][:200]
    assert len(responses) == 200
    assert [r.status_code for r in responses if r.status_code != 200] == []
    sizes = [r.json()["batch_size"] for r in responses]
    print(f"batch sizes: mean {np.mean(sizes):.2f}, max {max(sizes)}")
    assert max(sizes) > 1 and np.mean(sizes) > 1.5


def test_no_file_names_or_image_bytes_in_logs(url, ray_cluster, oct_sample):
    secret_name, secret_bytes = "PATIENT-DOE-JANE-QX7.jpeg", b"SECRET-PIXELS-ZW9"
    image = next((oct_sample / "DME").iterdir()).read_bytes()
    with api_client() as client:
        assert client.post(f"{url}/v1/oct/predict", files={"file": (secret_name, image)}).status_code == 200
        bad = client.post(f"{url}/v1/oct/predict", files={"file": (secret_name, secret_bytes)})
        assert bad.status_code == 422 and "SECRET" not in bad.text and "DOE-JANE" not in bad.text
    time.sleep(1)  # let the replicas' log handlers flush
    logs = Path(ray_cluster["temp_dir"]) / "session_latest" / "logs"
    texts = [p.read_bytes() for p in logs.rglob("*") if p.is_file()]
    assert any(b"POST /v1/{task}/predict 422" in t for t in texts)  # the access log is there ...
    assert not any(b"DOE-JANE" in t or secret_bytes in t for t in texts)  # ... without them


def test_metrics_reach_prometheus(url, odir_sample):
    import ray

    image = next((odir_sample / "images").iterdir()).read_bytes()
    with api_client() as client:
        assert predict(client, url, "odir", image).status_code == 200
        assert predict(client, url, "odir", b"not an image").status_code == 422
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = (
        "eyeray_serve_requests",
        'status="422"',
        "eyeray_serve_request_seconds",
        "eyeray_serve_batch_size",
        'task="odir"',
    )
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    assert [w for w in wanted if w not in text] == []
    assert any(line.startswith("ray_eyeray_serve_requests") and 'label="' in line for line in text.splitlines())


def test_token_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("EYERAY_API_TOKEN", raising=False)
    monkeypatch.delenv("EYERAY_API_TOKEN_FILE", raising=False)
    assert read_token() is None
    monkeypatch.setenv("EYERAY_API_TOKEN", "from-env")
    assert read_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("EYERAY_API_TOKEN_FILE", str(tmp_path / "token"))
    assert read_token() == "from-file"
    (tmp_path / "token").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_token()  # a broken secret never means "no auth"


def test_bearer_token_required_when_configured(url, oct_sample):
    image = next((oct_sample / "NORMAL").iterdir()).read_bytes()
    with httpx.Client(timeout=60) as anonymous:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": TOKEN},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
        ):
            response = predict(anonymous, url, "oct", image, headers=headers)
            assert response.status_code == 401 and response.json()["detail"], headers
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get(f"{url}/v1/models").status_code == 401
        assert anonymous.get(f"{url}/healthz").status_code == 200  # probes need no token
    with api_client() as authorised:
        assert predict(authorised, url, "oct", image).status_code == 200
        assert authorised.get(f"{url}/v1/models").status_code == 200


def replicas(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def test_autoscaling_out_and_in_and_a_killed_replica_is_replaced(url, bundles, oct_sample):
    import ray
    from ray import serve
    from ray.util.state import list_actors

    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 1,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 1,
    }
    args = ServeArgs(bundles=[bundles["oct"]], autoscaling=autoscaling, max_batch_size=1, **FAST)
    serve.run(build_app(args), name="eyeray-scale", route_prefix="/scale")
    base, image = f"{url}/scale", next((oct_sample / "DRUSEN").iterdir()).read_bytes()
    stop, failures = threading.Event(), []

    def load() -> None:
        with httpx.Client(timeout=60) as client:  # no token: this application runs without auth
            while not stop.is_set():
                response = predict(client, base, "oct", image)
                if response.status_code != 200 or response.json()["batch_size"] != 1:  # user_config applied
                    failures.append(response.text)

    try:
        assert replicas("eyeray-scale", "oct") == 1
        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: replicas("eyeray-scale", "oct") >= 2, 90, "no scale-out under load")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        wait_until(lambda: replicas("eyeray-scale", "oct") == 1, 90, "no scale-in after the load stopped")

        def alive() -> list:
            return list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", "ServeReplica:eyeray-scale:oct")])

        wait_until(lambda: len(alive()) == 1, 60, "the scaled-in replica did not stop")
        victim = alive()[0]
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        with httpx.Client(timeout=120) as client:  # waits for the replacement, then answers
            assert [predict(client, base, "oct", image).status_code for _ in range(5)] == [200] * 5
        now = alive()
        assert len(now) == 1 and now[0].actor_id != victim.actor_id
    finally:
        stop.set()
        serve.delete("eyeray-scale")


def test_shipped_serve_config_deploys_with_serve_run(url, bundles, ray_cluster, tmp_path, oct_sample):
    """jobs/serve_config.yaml as users run it (`serve run`), with this test's bundles and port."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "eyeray.serve:build_app"
    ServeArgs.model_validate(app["args"])
    models = [d for d in app["deployments"] if d["name"] != "api"]
    assert {d["name"] for d in models} == {"oct", "glaucoma", "odir"}
    assert all(d["ray_actor_options"]["num_gpus"] == 1 for d in models)  # GPU replicas by default

    app["args"]["bundles"] = [bundles[t] for t in ("oct", "glaucoma", "odir")]
    config["http_options"] = {"host": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])}
    for d in app["deployments"]:
        # This cluster has 2 CPUs and 2 logical GPUs, half of which the module's app holds.
        d["ray_actor_options"].update(num_cpus=0.1, **({"num_gpus": 0.1} if d["name"] != "api" else {}))
    app["route_prefix"] = "/config"
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run(
        ["serve", "run", "--non-blocking", str(path)],
        check=True,
        env=ray_cluster["env"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    try:
        wait_until(
            lambda: getattr(serve.status().applications.get("eyeray"), "status", "") == "RUNNING",
            120,
            f"the config app did not start: {serve.status().applications.get('eyeray')}",
        )
        image = next((oct_sample / "CNV").iterdir()).read_bytes()
        with httpx.Client(timeout=60) as client:
            for task in ("oct", "glaucoma", "odir"):
                response = predict(client, f"{url}/config", task, image)
                assert response.status_code == 200 and response.json()["task"] == task
    finally:
        serve.delete("eyeray")


def test_demo_posts_images_and_shows_the_broken_one(url, bundles, oct_sample, tmp_path):
    from eyeray.demo import serve_images

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good = sorted((oct_sample / "NORMAL").iterdir())[:2]
    answers = serve_images(bundles["oct"], [*good, broken], port=int(url.rsplit(":", 1)[1]), route_prefix="/demo")
    assert [a["status"] for a in answers] == [200, 200, 422]
    assert answers[0]["file"] == good[0].name and answers[0]["label"] in get_task("oct").classes
    assert answers[2]["detail"]
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/healthz").status_code == 200  # the module's app survived the demo


def test_cli_serve_flags():
    import argparse

    from eyeray.cli import add_serve_arguments

    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(
        ["--bundle", "a", "--bundle", "s3://b/c", "--port", "8123", "--gpus-per-replica", "1"]
    )
    assert (args.bundles, args.port, args.gpus_per_replica, args.host) == (["a", "s3://b/c"], 8123, 1.0, "127.0.0.1")


def test_decode_upload_uses_the_manifests_preprocessing_and_turns_any_failure_into_422(bundles):
    """The ingress's decode + preprocess (no cluster needed): the bundle's resize size and method,
    the stricter of the two max_pixels, and every decode failure a 422 with the batch rows' reason."""
    from fastapi import HTTPException

    from eyeray.serve.inputs import decode_upload

    manifest = bundle.read_manifest(bundles["oct"])
    png = encode(Image.fromarray(np.arange(40 * 60, dtype=np.uint8).reshape(40, 60)), "PNG")
    original, image, size = decode_upload(png, manifest, imaging.DEFAULT_MAX_PIXELS)
    np.testing.assert_array_equal(original, imaging.decode(png))
    assert size == (40, 60)
    np.testing.assert_array_equal(image, imaging.preprocess(original, 32, "bilinear"))
    nearest = {**manifest, "preprocessing": {**manifest["preprocessing"], "max_pixels": 1000}}
    nearest["preprocessing"]["resize"] = {**manifest["preprocessing"]["resize"], "method": "nearest"}
    small = np.random.default_rng(0).integers(0, 256, (30, 30), np.uint8)
    _, image, size = decode_upload(encode(Image.fromarray(small), "PNG"), nearest, 10**9)
    assert size == (30, 30)
    np.testing.assert_array_equal(image, imaging.preprocess(imaging.gray_to_rgb(small), 32, "nearest"))
    assert not np.array_equal(image, imaging.preprocess(imaging.gray_to_rgb(small), 32, "bilinear"))
    for limited, service_limit in ((nearest, 10**9), (manifest, 1000)):  # the stricter limit wins
        with pytest.raises(HTTPException) as info:
            decode_upload(png, limited, service_limit)
        assert info.value.status_code == 422 and "limit 1000" in info.value.detail
    odd = tiff_with_a_page_without_dimensions()
    with pytest.raises(HTTPException) as info:
        decode_upload(odd, manifest, imaging.DEFAULT_MAX_PIXELS)
    assert (info.value.status_code, info.value.detail) == (422, imaging.decode_value(odd)[1])


def test_an_upload_whose_decoder_raises_an_unexpected_error_gets_422_not_500(url, oct_sample):
    """Pillow raises TypeError (not one of its decode errors) on a TIFF page without dimensions:
    the answer is the 422 and reason batch scoring writes for the same file, on predict and explain."""
    odd = tiff_with_a_page_without_dimensions()
    reason = imaging.decode_value(odd)[1]
    with api_client() as client:
        for route, raw in (("predict", False), ("predict", True), ("explain", False)):
            if raw:
                response = predict(client, url, "oct", odd, raw=True)
            else:
                response = client.post(f"{url}/v1/oct/{route}", files={"file": ("odd.tif", odd)})
            assert (response.status_code, response.json()) == (422, {"detail": reason}), (route, response.text)
        sample = next((oct_sample / "CNV").iterdir()).read_bytes()
        assert predict(client, url, "oct", sample).status_code == 200


def test_mixed_thresholds_and_tta_in_one_burst_each_answer_its_own_and_model_seconds_exported(url, bundles, oct_sample):
    """Mixed traffic: at once, the same scans with different `?thresholds=` (batched together by
    @serve.batch, decided per override), to the module's app and to an application serving with
    test-time augmentation (and its model compiled with XLA). Each answer
    is what the batch scorer's `Bundle.predict` + `Bundle.decide` make of that scan with that override;
    the model-call latency histogram reaches Prometheus."""
    import ray
    from ray import serve

    from eyeray.decision.operating_points import parse_thresholds

    # float32: with --mixed-precision the answers would move by up to test_compiled.BFLOAT16_ATOL (this CPU
    # has bfloat16), and labels near a threshold with them; the score test runs that flag through actors
    tta_app = ServeArgs(bundles=[bundles["oct"]], inference=InferenceOptions(tta=True, jit_compile=True), **FAST)
    serve.run(build_app(tta_app), name="eyeray-tta", route_prefix="/tta")
    try:
        scans = [sorted((oct_sample / c).iterdir())[1] for c in get_task("oct").classes]
        overrides = [None, "0", "1", "0.35"]
        cases = [(tta, scan, t) for tta in (False, True) for scan in scans for t in overrides]
        start = threading.Barrier(len(cases))

        def send(case) -> httpx.Response:
            tta, scan, thresholds = case
            base = f"{url}/tta" if tta else url
            params = {} if thresholds is None else {"thresholds": thresholds}
            with api_client() as client:
                start.wait()
                return predict(client, base, "oct", scan.read_bytes(), params=params)

        with ThreadPoolExecutor(len(cases)) as pool:
            responses = list(pool.map(send, cases))
        assert [r.status_code for r in responses] == [200] * len(cases), [r.text for r in responses]

        loaded = bundle.load(bundles["oct"])
        differs = False
        for (tta, scan, thresholds), response in zip(cases, responses):
            answer = response.json()
            # decoded as Serve decodes a prediction's upload: only as large as the model input needs
            image = imaging.decode(scan.read_bytes(), min_side=loaded.image_size)
            image = imaging.preprocess(image, loaded.image_size)[None]
            expected = loaded.decide(loaded.predict(image, tta=tta), parse_thresholds(thresholds)).answer(
                0, loaded.classes
            )
            name = f"{scan.name} tta={tta} thresholds={thresholds}"
            for key in ("status", "labels", "label", "referral", "needs_review", "operating_point", "gate"):
                assert answer[key] == expected[key], (name, key)
            assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5), name
            assert answer["confidence"] == pytest.approx(expected["confidence"], abs=1e-5), name
            plain = loaded.decide(loaded.predict(image)).answer(0, loaded.classes)["probabilities"]
            differs |= tta and not np.allclose(list(plain.values()), list(answer["probabilities"].values()), atol=1e-4)
        assert differs, "TTA changed no answer: the TTA application did not use it"
        sizes = [r.json()["batch_size"] for r in responses]
        print(f"batch sizes: {sizes}")
        # each application gets 4 requests per override: a model call of 5 or more mixed overrides
        assert max(sizes) >= 5, sizes
        referral = {t: [r.json()["referral"] for c, r in zip(cases, responses) if c[2] == t] for t in overrides}
        assert all(referral["0"]) and not any(referral["1"])  # the overrides did apply
    finally:
        serve.delete("eyeray-tta")

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, lines = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if "eyeray_serve_model_seconds_count" in ln and 'task="oct"' in ln]
        if lines:
            break
        time.sleep(2)
    assert lines, "eyeray_serve_model_seconds is not exported"
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) >= 2  # at least one model call per application


def test_a_gated_bundle_answers_200_declined_for_what_its_gate_refuses_on_predict_and_explain(
    url, bundles, glaucoma_sample, tmp_path
):
    """The image was valid; the model declines: 200 with status declined, no labels, probabilities,
    confidence or referral, and the gate's reason; an image the gate passes is answered, with the
    verdict and score `Bundle.verdict` gives for the same decode. The schema documents both."""
    from ray import serve

    real = sorted((glaucoma_sample / "NRG").iterdir())[:60]
    images = np.stack([imaging.load_record({"path": str(p)}, 32)["image"] for p in real])
    gated = with_gate(bundles["glaucoma"], images[:40], images[40:], tmp_path / "gated")
    flat = encode(Image.new("RGB", (200, 200), (90, 90, 90)), "PNG")
    serve.run(build_app(ServeArgs(bundles=[gated], **FAST)), name="gated", route_prefix="/gated")
    try:
        with httpx.Client(timeout=60) as client:
            declined = predict(client, f"{url}/gated", "glaucoma", flat)
            scans = [predict(client, f"{url}/gated", "glaucoma", p.read_bytes()) for p in real[40:45]]
            explained = client.post(f"{url}/gated/v1/glaucoma/explain", files={"file": ("flat", flat)})
            schemas = client.get(f"{url}/gated/openapi.json").json()["components"]["schemas"]
    finally:
        serve.delete("gated")
    assert declined.status_code == explained.status_code == 200, (declined.text, explained.text)
    for answer in (declined.json(), explained.json()):
        assert answer["status"] == "declined" and answer["needs_review"], answer
        assert answer["labels"] == [] and answer["probabilities"] == {} and answer["label"] is None
        assert answer["confidence"] is None and answer["referral"] is None
        assert (
            answer["gate"]["verdict"] == "ungradable" and answer["gate"]["reason"] == "ungradable: blank or flat image"
        )
    assert explained.json()["overlay_png"]  # what the model looked at, although it does not answer
    loaded = bundle.load(gated)
    for path, response in zip(real[40:45], scans):
        answer = response.json()
        record = imaging.load_record({"path": str(path)}, 32)
        probs, features = loaded.infer(record["image"][None])
        verdict = loaded.verdict(record["image"][None], features, [record["height"]], [record["width"]])
        assert answer["gate"]["verdict"] == verdict.verdict[0], path.name
        assert answer["gate"]["score"] == pytest.approx(verdict.score[0], abs=1e-3), path.name
        assert answer["status"] == ("declined" if verdict.declined[0] else "ok")
    assert schemas["Prediction"]["properties"]["status"]["enum"] == ["ok", "declined"]
    assert set(schemas["GateAnswer"]["properties"]["verdict"]["enum"]) >= {
        "passed",
        "out_of_distribution",
        "ungradable",
    }


def test_route_answers_an_upload_by_the_tasks_whose_gate_accepts_it(url, tmp_path):
    """POST /v1/route: an OCT scan gets the OCT answer, a fundus photo the glaucoma one, a letter and
    a DICOM whose header contradicts its pixels are out of scope with each task's verdict; a service
    whose bundles have no gate refuses to route (409)."""
    from ray import serve

    gated = gated_task_bundles(tmp_path)
    serve.run(build_app(ServeArgs(bundles=list(gated.values()), **FAST)), name="routed", route_prefix="/routed")
    letter = Image.new("RGB", (300, 400), "white")
    for line in range(20):
        ImageDraw.Draw(letter).text((20, 20 + 18 * line), "Dear colleague, thank you for the referral", fill="black")
    images = {task: drawn(task, 4, 40 + k) for k, task in enumerate(gated)}
    uploads = {task: [encode(Image.fromarray(x), "PNG") for x in xs] for task, xs in images.items()}
    oct_as_fundus = make_dicom(drawn("oct", 1, 50)[0, ..., 0], modality="OP")  # an OCT B-scan said to be a photo
    try:
        with httpx.Client(timeout=60) as client:
            answers = {
                t: [client.post(f"{url}/routed/v1/route", files={"file": ("x", d)}) for d in u]
                for t, u in uploads.items()
            }
            outside = [
                client.post(f"{url}/routed/v1/route", files={"file": ("x", d)})
                for d in (encode(letter, "PNG"), oct_as_fundus)
            ]
            schemas = client.get(f"{url}/routed/openapi.json").json()["components"]["schemas"]
            cube = make_oct_volume([drawn("oct", 2, 60)[i, ..., 0] for i in range(2)])
            volume = client.post(f"{url}/routed/v1/route", content=cube, headers={"Content-Type": "application/dicom"})
        with api_client() as client:
            gateless = client.post(f"{url}/v1/route", files={"file": ("x", uploads["oct"][0])})
    finally:
        serve.delete("routed")
    # the tasks each upload goes to are those whose bundle's own gate passes the same pixels (a gate
    # keeping 95 % of its validation images declines about one in twenty of its own modality)
    loaded = {task: bundle.load(uri) for task, uri in gated.items()}
    own = 0
    for task, responses in answers.items():
        for x, r in zip(images[task], responses):
            assert r.status_code == 200, r.text
            body = r.json()
            expected = []
            for t, b in sorted(loaded.items()):
                verdict = b.verdict(x[None], b.infer(x[None])[1], [x.shape[0]], [x.shape[1]])
                expected += [t] if not verdict.declined[0] else []
            assert [a["task"] for a in body["answers"]] == expected, body
            assert body["status"] == ("ok" if expected else "out_of_scope")
            assert all(a["gate"]["verdict"] == "passed" and a["labels"] for a in body["answers"])
            own += expected == [task]
    assert own >= 6, own  # of 8: each modality goes to its own task
    for r in outside:
        body = r.json()
        assert r.status_code == 200 and body["status"] == "out_of_scope" and body["answers"] == [], body
        assert body["reason"].startswith("glaucoma: ") and "; oct: " in body["reason"], body
    assert outside[1].json()["reason"].endswith("; DICOM modality OP")
    assert schemas["Routed"]["properties"]["status"]["enum"] == ["ok", "out_of_scope"]
    assert gateless.status_code == 409 and "has none" in gateless.json()["detail"]
    assert volume.status_code == 422  # a volume is answered by /predict, B-scan by B-scan, never by one frame
    assert volume.json()["detail"] == "this upload is a volume of 2 frames: /v1/{task}/predict answers volumes"


def test_a_volume_upload_is_answered_as_batch_scoring_answers_it(url, bundles, oct_sample, tmp_path):
    """An OCT cube (JPEG 2000, real B-scans) posted to /predict: every B-scan answered as batch scoring
    answers its row, and the volume's answer is the one batch scoring writes to _volumes.parquet."""
    names = ["CNV-6552587-1.jpeg", "CNV-6552587-2.jpeg", "NORMAL-75834-1.jpeg", "DME-247204-1.jpeg"]
    cube = make_oct_volume(real_bscans(oct_sample, names, size=(256, 248)), jpeg2000=True)
    with api_client() as client:
        response = predict(client, url, "oct", cube, raw=True)
        explained = client.post(f"{url}/v1/oct/explain", content=cube, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [b["frame"] for b in answer["bscans"]] == [0, 1, 2, 3] and answer["frames"] == 4
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "cube.dcm").write_bytes(cube)
    from eyeray.score import ScoreConfig, run

    out = tmp_path / "scores"
    run(ScoreConfig(bundles=[bundles["oct"]], input=str(archive), output=str(out), cpus_per_actor=0.5))
    rows = {
        r["frame"]: r
        for r in pads.dataset(str(out), format="parquet", exclude_invalid_files=True).to_table().to_pylist()
    }
    for scan in answer["bscans"]:
        row = rows[scan["frame"]]
        assert_same(scan, row, f"B-scan {scan['frame']}")
    (volume,) = pq.read_table(out / "_volumes.parquet").to_pylist()
    assert answer["driving_frames"] == volume["driving_frames"] and answer["reason"] == volume["reason"]
    assert (answer["status"], answer["referral"], answer["labels"]) == (
        volume["status"],
        volume["referral"],
        volume["labels"],
    )
    assert explained.status_code == 422
    assert explained.json()["detail"].startswith("this upload is a volume of 4 frames: /explain takes one image")
