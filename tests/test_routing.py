"""Mixed archives (eyeray.score.routing): bundles of several tasks in one scoring run, each image
sent to the task(s) whose gate accepts it, one row per (file, task), out-of-scope and error rows,
exactly once across re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bundles import drawn, gated_task_bundles, make_bundle
from corpus import encode, gradient, make_dicom
from PIL import Image, ImageDraw

from eyeray.data import imaging
from eyeray.decision import gate
from eyeray.model import bundle
from eyeray.model.bundle import BundleError
from eyeray.score import ScoreConfig, routing, run, shards


@pytest.fixture(scope="module")
def task_bundles(tmp_path_factory) -> dict[str, str]:
    return gated_task_bundles(tmp_path_factory.mktemp("routing"))


def test_group_refuses_what_cannot_route(task_bundles, tmp_path):
    manifests = [bundle.read_manifest(u) for u in task_bundles.values()]
    assert [g.task for g in routing.group(manifests)] == ["oct", "glaucoma"]
    with pytest.raises(BundleError, match="--gate off needs one task"):
        routing.group(manifests, gate_on=False)
    gateless = bundle.read_manifest(make_bundle(tmp_path, task="glaucoma"))
    with pytest.raises(BundleError, match="has none"):
        routing.group([manifests[0], gateless])
    assert len(routing.group([gateless], gate_on=False)) == 1  # one task: no routing, no gate needed


def test_routed_table_gives_a_row_per_file_and_answering_task_in_file_order(task_bundles):
    manifests = [bundle.read_manifest(u) for u in task_bundles.values()]
    n = 4  # rows: both tasks answer; only glaucoma; neither; a decode error
    columns = {"path": np.array(list("abcd"), object), "error": np.array(["", "", "", "bad"], object)}
    columns.update(width=np.full(n, 64), height=np.full(n, 64))
    verdicts = {
        "oct": ["passed", "out_of_distribution", "ungradable", ""],
        "glaucoma": ["passed"] * 2 + ["out_of_distribution", ""],
    }
    for m in manifests:
        task, k = m["task"], len(m["classes"])
        prefix = f"{task}{routing.SEPARATOR}"
        columns.update(
            {
                prefix + "gate": np.array(verdicts[task], object),
                prefix + "gate_reason": np.array(["", "", "blurred", ""] if task == "oct" else [""] * n, object),
                prefix + "gate_score": np.array([0.5, 2.0, 0.7, np.nan], np.float32),
                prefix + "probabilities": np.full((n, k), 1 / k, np.float32),
                prefix + "label": np.array([m["classes"][0]] * 3 + [""], object),
                prefix + "referral": np.array([1, 0, 0, np.nan], np.float32),
                prefix + "confidence": np.full(n, 0.9, np.float32),
                prefix + "needs_review": np.zeros(n, bool),
                prefix + "explanations": np.array([""] * n, object),
            }
        )
    table = shards.routed_table(columns, manifests, "route-key")
    rows = table.to_pylist()
    assert [(r["path"], r["task"], r["status"]) for r in rows] == [
        ("a", "oct", "ok"),
        ("a", "glaucoma", "ok"),
        ("b", "glaucoma", "ok"),
        ("c", None, "declined"),
        ("d", None, "error"),
    ]
    assert pa.types.is_map(table.schema.field("probabilities").type)
    assert pa.types.is_list(table.schema.field("label").type) and rows[0]["label"] == ["CNV"]
    assert dict(rows[1]["probabilities"]) == pytest.approx({"NRG": 0.5, "RG": 0.5})
    out = rows[3]
    assert out["gate"] == gate.OUT_OF_SCOPE and out["label"] == [] and out["probabilities"] is None
    assert out["gate_reason"] == "oct: ungradable (blurred); glaucoma: out_of_distribution (0.70)"
    assert out["needs_review"] and out["confidence"] is None


def test_a_dicom_header_names_the_tasks_its_image_may_go_to():
    """OPT goes to OCT only and OP to the fundus tasks, whatever the gates say; other files and
    modalities no task claims are left to the gates."""
    gates = np.array(["passed"] * 5, object)
    columns = {"path": np.array(list("abcde"), object), "modality": np.array(["OPT", "OP", "", "CT", "XC"], object)}
    columns.update({f"{t}{routing.SEPARATOR}gate": gates for t in ("oct", "glaucoma", "odir")})
    routed = routing.routed(columns, ["oct", "glaucoma", "odir"])
    assert routed["oct"].tolist() == [True, False, True, True, False]
    assert routed["glaucoma"].tolist() == routed["odir"].tolist() == [False, True, True, True, True]
    assert imaging.dicom_modality(make_dicom(gradient()[..., 0], modality="OPT")) == "OPT"
    assert imaging.dicom_modality(make_dicom(gradient()[..., 0])) == ""  # no Modality attribute
    assert imaging.dicom_modality(encode(gradient(), "PNG")) == ""
    record = imaging.load_record({"path": "x.dcm", "bytes": make_dicom(gradient()[..., 0], modality="OP")}, 32)
    assert record["modality"] == "OP" and record["error"] == ""


def page(path: Path) -> None:
    """A scanned letter: no retinal image at all."""
    letter = Image.new("RGB", (300, 400), "white")
    draw = ImageDraw.Draw(letter)
    for line in range(20):
        draw.text((20, 20 + 18 * line), "Dear colleague, thank you for the referral of", fill="black")
    letter.save(path)


@pytest.mark.cluster
def test_a_mixed_archive_goes_where_the_gates_send_it_exactly_once(ray_cluster, task_bundles, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    loaded = {task: bundle.load(uri) for task, uri in task_bundles.items()}
    expected = {}  # file -> the tasks whose own gate passes its pixels (a 95 % gate declines ~1 in 20)
    for task, seed in (("oct", 30), ("glaucoma", 31)):
        for i, image in enumerate(drawn(task, 6, seed)):
            Image.fromarray(image).save(archive / f"{task}-{i}.png")
            x, side = image[None], [image.shape[0]]
            passes = [t for t, b in loaded.items() if not b.verdict(x, b.infer(x)[1], side, side).declined[0]]
            expected[f"{task}-{i}.png"] = passes
    page(archive / "letter.png")
    (archive / "broken.jpg").write_bytes(b"not an image")
    output = str(tmp_path / "scored")
    config = ScoreConfig(bundles=list(task_bundles.values()), input=str(archive), output=output)
    summary = run(config)
    rows = pa.concat_tables(
        [pq.read_table(p) for p in sorted(Path(output).glob(f"{shards.PART_PREFIX}*.parquet"))]
    ).to_pylist()
    where = {}
    for row in rows:
        where.setdefault(Path(row["path"]).name, []).append((row["task"], row["status"]))
    assert len(where) == 14 and summary["files_seen"] == 14
    for name, tasks in expected.items():
        assert where[name] == ([(t, "ok") for t in tasks] or [(None, "declined")]), (name, where[name])
    assert sum(tasks == [name.split("-")[0]] for name, tasks in expected.items()) >= 10  # of 12: its own task
    assert where["letter.png"] == [(None, "declined")] and where["broken.jpg"] == [(None, "error")]
    unrouted = 1 + sum(not tasks for tasks in expected.values())
    routed = {t: sum(t in tasks for tasks in expected.values()) for t in task_bundles}
    assert summary["routing"] == {**routed, "out of scope": unrouted}
    assert summary["declined_by_reason"] == {gate.OUT_OF_SCOPE: unrouted} and summary["errors"] == 1
    assert summary["predictions"].keys() >= {"oct: CNV", "glaucoma: RG"}
    assert summary["bundle_version"].startswith("route-")
    report = (Path(output) / "report.html").read_text()
    assert "<h2>Routing</h2>" in report and "letter.png" in report
    again = run(config)  # exactly once: nothing left to score
    assert again["scored_this_run"] == 0 and again["rows"] == len(rows)
    assert json.loads((Path(output) / "summary.json").read_text())["routing"] == summary["routing"]
