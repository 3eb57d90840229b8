"""The API against its own OpenAPI document: schemathesis reads the live application's /openapi.json
(one path per served task, each task's classes, the bearer token) and sends what it allows, with
real sample images among the generated upload bytes. Every answer must be no 5xx, with a documented
status code, content type and body schema."""

from __future__ import annotations

import io

import numpy as np
import pytest
import schemathesis
from bundles import drawn, gated_task_bundles, make_bundle, with_gate
from conftest import free_port
from corpus import make_oct_volume
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from PIL import Image
from samples import SAMPLES as SHARED_DATA
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from eyeray.serve import ServeArgs, build_app

pytestmark = pytest.mark.cluster

TOKEN = "schema-token"
TASKS = ("oct", "glaucoma", "odir")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SAMPLES = [sorted((SHARED_DATA / folder).rglob("*.jp*g"))[:2] for folder in ("oct-sample", "glaucoma-sample")]


def uploads() -> list[bytes]:
    """Real samples (the gates, fitted on generated images, decline them), generated images of each
    task that its gate accepts (answers with labels), an OCT volume of two B-scans, and two that
    do not decode (a truncated JPEG, text)."""
    real = [path.read_bytes() for paths in SAMPLES for path in paths]
    generated = [png(x) for k, task in enumerate(TASKS) for x in drawn(task, 2, 40 + k)]
    volume = make_oct_volume([drawn("oct", 2, 60)[i, ..., 0] for i in range(2)])
    return real + generated + [volume, real[0][: len(real[0]) // 3], b"not an image"]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# Every `format: binary` value (the multipart `file` field, the raw bodies) is one of these.
UPLOADS = uploads()
schemathesis.openapi.format("binary", st.sampled_from(UPLOADS))


@pytest.fixture(scope="module")
def api_schema(ray_cluster, tmp_path_factory):
    """The three tasks, each with a gate (so /v1/route answers), a token required, on 127.0.0.1."""
    from ray import serve

    root = tmp_path_factory.mktemp("schema-bundles")
    bundles = gated_task_bundles(root)
    odir = make_bundle(root / "odir", task="odir", decision=True, seed=2)
    bundles["odir"] = with_gate(odir, drawn("odir", 120, 12), drawn("odir", 60, 22), root / "odir-gated")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(
        bundles=list(bundles.values()),
        ingress_env={"EYERAY_API_TOKEN": TOKEN},
        cpus_per_replica=0.1,
        ingress_cpus=0.1,
        max_body_bytes=2**20,
    )
    serve.run(build_app(args), name="eyeray-schema", route_prefix="/")
    try:
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    finally:
        serve.shutdown()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_api_answers_as_its_openapi_document_says(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)


def test_every_upload_kind_answers_as_documented(api_schema):
    """Fuzzing draws few of the uploads; each one here, on every upload route, raw and multipart:
    answers with labels, declined ones, a volume's answer (and its 422 on /explain and /route),
    undecodable files. The same checks."""
    statuses = set()
    for path in [f"/v1/{task}/{route}" for task in TASKS for route in ("predict", "explain")] + ["/v1/route"]:
        operation = api_schema[path]["POST"]
        for k, data in enumerate(UPLOADS):
            body, media_type = ({"file": data}, "multipart/form-data") if k % 2 else (data, "application/octet-stream")
            response = operation.Case(body=body, media_type=media_type).call_and_validate(
                headers=AUTH, checks=CHECKS, timeout=60
            )
            answer = response.json()
            statuses.add((response.status_code, answer.get("status"), "bscans" in answer))
    assert {(200, "ok", False), (200, "declined", False), (422, None, False)} <= statuses, statuses
    assert any(volume for _, _, volume in statuses), statuses


def test_the_document_names_each_tasks_paths_and_classes(api_schema):
    """The constraints the fuzzing relies on are there: per-task paths, the class enum, alpha's bounds,
    the bearer scheme, and no 404 for a task the document cannot name."""
    raw = api_schema.raw_schema
    assert {"/v1/oct/predict", "/v1/glaucoma/explain", "/v1/odir/predict", "/v1/route"} <= set(raw["paths"])
    assert not [p for p in raw["paths"] if "{task}" in p]
    explain = raw["paths"]["/v1/oct/explain"]["post"]
    params = {p["name"]: p["schema"] for p in explain["parameters"]}
    assert params["class"]["enum"] == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert (params["alpha"]["minimum"], params["alpha"]["maximum"]) == (0, 1)
    assert explain["security"] == [{"bearer": []}] and "404" not in explain["responses"]
    assert raw["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for code in ("400", "401", "413", "415", "422", "503"):
        problem = explain["responses"][code]["content"]["application/json"]["schema"]
        assert problem == {"$ref": "#/components/schemas/Problem"}, code
