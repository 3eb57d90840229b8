"""The scoring run's report.html: one self-contained page a clinician or an on-call engineer opens.

How the rows were decided (calibration, operating point, any override), the review queue first
(the least confident cases with their Grad-CAM overlays, so a clinician starts with the uncertain
ones; all of them in review_queue.csv), the class distribution (bar chart), the errors grouped by
reason with example paths, and a few thumbnails per predicted class (read back through the same
decoder). Images are inlined as data URIs, so the page can be mailed or attached to a ticket; it
holds no full-size pixels.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from eyeray import storage
from eyeray.data import imaging

REPORT_FILE = "report.html"
REVIEW_FILE = "review_queue.csv"
REVIEW_SHOWN = 60  # the least confident cases shown with overlays; all of them are in REVIEW_FILE
EXAMPLES_PER_CLASS = 4
ERROR_EXAMPLES = 5
THUMBNAIL = 160

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right}figure{display:inline-block;margin:4px;text-align:center;font-size:11px;max-width:170px;word-break:break-all}
.note{color:#666;font-size:90%}.review figure{max-width:250px}.review img{max-width:240px}"""


def write(output: str, summary: dict[str, Any], rows: pa.Table) -> str:
    """Write OUTPUT/report.html and OUTPUT/review_queue.csv from the summary and the committed rows."""
    queue = review_queue(rows)
    _write_csv(storage.join(output, REVIEW_FILE), queue)
    page = render(summary, rows, queue, output)
    uri = storage.join(output, REPORT_FILE)
    fs, path = storage.filesystem(uri)
    fs.pipe(path, page.encode())
    return uri


def review_queue(rows: pa.Table) -> list[dict[str, Any]]:
    """Rows marked needs_review, least confident first (the queue is small next to the archive)."""
    if not rows.num_rows or "needs_review" not in rows.column_names:
        return []
    flagged = rows.filter(pc.fill_null(rows.column("needs_review"), False))
    queue = flagged.sort_by([("confidence", "ascending"), ("path", "ascending")])
    return queue.select(["path", "confidence", "label", "referral", "explanations"]).to_pylist()


def _write_csv(uri: str, queue: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "path", "confidence", "labels", "referral", "overlays"])
    for rank, row in enumerate(queue, 1):
        writer.writerow(
            [
                rank,
                row["path"],
                f"{row['confidence']:.4f}",
                _labels(row["label"]),
                "" if row["referral"] is None else row["referral"],
                " ".join(row["explanations"] or []),
            ]
        )
    fs, path = storage.filesystem(uri)
    fs.pipe(path, buf.getvalue().encode())


def _labels(label) -> str:
    return ", ".join(label) if isinstance(label, list) else (label or "")


def render(
    summary: dict[str, Any], rows: pa.Table, queue: list[dict[str, Any]] | None = None, output: str | None = None
) -> str:
    e = html.escape
    models = ", ".join(f"{b['backbone']} {b['version']}" for b in summary.get("bundles", []))
    ensemble = f" ({summary['ensemble']} ensemble)" if summary.get("ensemble") else ""
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>eyeray scoring: {e(summary['task'])}</title><style>{STYLE}</style>",
        f"<h1>Scoring report: {e(summary['task'])}</h1>",
        f"<p>Model{ensemble}: {e(models) or e(summary['bundle_version'])}. "
        f"{summary['files_seen']} files seen, {summary['scored']} scored, {summary['errors']} errors; "
        f"{summary['scored_this_run']} scored in this run ({summary['wall_seconds']} s, "
        f"{summary['images_per_s_this_run']} images/s).</p>",
        "<p class='note'>Research use only: predictions are not a diagnosis and must be reviewed by a "
        "qualified clinician.</p>",
        _decision(summary),
        f"<h2>Review queue ({len(queue or [])})</h2>",
        _review(queue or [], output),
        "<h2>Predicted classes</h2>",
        _distribution(summary["predictions"]),
        "<h2>Errors</h2>",
        _errors(summary, rows),
        "<h2>Examples per predicted class</h2>",
        _examples(rows, list(summary["predictions"])),
    ]
    return "\n".join(parts)


def _decision(summary: dict[str, Any]) -> str:
    """How probabilities became answers, in words a reader can check against the bundle."""
    d = summary.get("decision") or {}
    op = d.get("operating_point")
    if op is None:
        point = "no operating point in the bundle: argmax, or 0.5 per label"
    elif "threshold" in op:
        point = (
            f"{html.escape(op['rule'])}: refer when {html.escape(op.get('score', ''))} &ge; {op['threshold']:.4f} "
            f"(target {op.get('target')}, {html.escape(op.get('chosen_on', ''))})"
        )
    else:
        point = f"{html.escape(op['rule'])} ({html.escape(op.get('chosen_on', ''))}): " + html.escape(
            json.dumps(op.get("thresholds") or op.get("members"))
        )
    referred = summary.get("referred")
    refer = "" if referred is None else f" <b>{referred}</b> of {summary['scored']} scored images are referred."
    return (
        f"<h2>Decision</h2><p>Probabilities are calibrated ({html.escape(', '.join(d.get('calibration', [])))}). "
        f"Operating point: {point}.{refer} Test-time augmentation: {'on' if d.get('tta') else 'off'}. "
        f"Cases with a calibrated confidence below {d.get('review_below')} need review.</p>"
    )


def _review(queue: list[dict[str, Any]], output: str | None) -> str:
    if not queue:
        return "<p>No case is below the review level.</p>"
    figures = []
    for row in queue[:REVIEW_SHOWN]:
        caption = (
            f"{html.escape(row['path'].rsplit('/', 1)[-1])}<br>{html.escape(_labels(row['label']))} · "
            f"confidence {row['confidence']:.2f}" + (" · <b>refer</b>" if row["referral"] else "")
        )
        overlays = row["explanations"] or []
        if overlays and output is not None:
            figures.append(_figure(storage.join(output, overlays[0]), caption, size=240, fmt="PNG"))
        else:
            figures.append(_figure(row["path"], caption + "<br><span class='note'>no overlay (--explain)</span>"))
    more = (
        f"<p class='note'>{len(queue) - REVIEW_SHOWN} more in {REVIEW_FILE}.</p>" if len(queue) > REVIEW_SHOWN else ""
    )
    return (
        f"<p class='note'>Least confident first, with the Grad-CAM overlay of the decided class; the full list "
        f"is {REVIEW_FILE}.</p><div class='review'>{''.join(figures)}</div>{more}"
    )


def _distribution(predictions: dict[str, int]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, counts = list(predictions), list(predictions.values())
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(classes) + 2), 3))
    bars = ax.bar(classes, counts, color="#4c72b0")
    ax.bar_label(bars)
    ax.set_ylabel("images")
    ax.spines[["top", "right"]].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    total = sum(counts) or 1
    table = "".join(
        f"<tr><td>{html.escape(c)}</td><td class='num'>{n}</td><td class='num'>{100 * n / total:.1f} %</td></tr>"
        for c, n in predictions.items()
    )
    return (
        f"<img alt='class distribution' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        f"<table><tr><th>class</th><th>images</th><th>share</th></tr>{table}</table>"
    )


def _errors(summary: dict[str, Any], rows: pa.Table) -> str:
    if not summary["errors"]:
        return "<p>No file failed.</p>"
    examples: dict[str, list[str]] = defaultdict(list)
    wanted = {reason: min(count, ERROR_EXAMPLES) for reason, count in summary["errors_by_reason"].items()}
    for batch in rows.filter(_is(rows, "error")).select(["path", "error"]).to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            if len(examples[row["error"]]) < ERROR_EXAMPLES:
                examples[row["error"]].append(row["path"])
        if all(len(examples[reason]) >= n for reason, n in wanted.items()):
            break
    body = "".join(
        f"<tr><td>{html.escape(reason)}</td><td class='num'>{count}</td>"
        f"<td>{'<br>'.join(html.escape(p) for p in examples[reason])}</td></tr>"
        for reason, count in summary["errors_by_reason"].items()
    )
    return f"<table><tr><th>reason</th><th>files</th><th>examples</th></tr>{body}</table>"


def _examples(rows: pa.Table, classes: list[str]) -> str:
    picked: dict[str, list[str]] = {c: [] for c in classes}
    for batch in rows.filter(_is(rows, "ok")).select(["path", "label"]).to_batches(max_chunksize=4096):
        for row in batch.to_pylist():  # batch by batch: an archive of millions is never one Python list
            labels = row["label"] if isinstance(row["label"], list) else [row["label"]]
            for label in labels:
                if label in picked and len(picked[label]) < EXAMPLES_PER_CLASS:
                    picked[label].append(row["path"])
        if all(len(p) >= EXAMPLES_PER_CLASS for p in picked.values()):
            break
    sections = []
    for label, paths in picked.items():
        figures = "".join(_figure(p) for p in paths) or "<p class='note'>none predicted</p>"
        sections.append(f"<h3>{html.escape(label)}</h3>{figures}")
    return "\n".join(sections)


def _figure(path: str, caption: str | None = None, size: int = THUMBNAIL, fmt: str = "JPEG") -> str:
    name = path.rsplit("/", 1)[-1]
    caption = caption if caption is not None else html.escape(name)
    try:
        image = Image.fromarray(imaging.decode(storage.read_bytes(path)))
    except (OSError, ValueError) as exc:  # moved or changed since it was scored
        return f"<figure>unavailable: {html.escape(str(exc))}<figcaption>{caption}</figcaption></figure>"
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return (
        f"<figure><img alt='{html.escape(name)}' src='data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _is(rows: pa.Table, status: str):
    return pc.equal(rows.column("status"), status)
