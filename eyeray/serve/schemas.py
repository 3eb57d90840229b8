"""The API's request and answer models: FastAPI validates and documents the answers with them, and
`Problem` is the body of every error the service sends (`{"detail": reason}`)."""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
from typing import Any, Literal

from pydantic import BaseModel, Field


class GateAnswer(BaseModel):
    verdict: Literal["passed", "out_of_distribution", "ungradable", "no gate", "off"] = Field(
        description="passed; out_of_distribution or ungradable (declined: no diagnosis); no gate (a bundle made "
        "before the gate); off (the service runs with the gate off)"
    )
    reason: str = Field(description="why, in words (empty when passed)")
    score: float | None = Field(description="distance to the training images over the gate's threshold (> 1: declined)")


class Prediction(BaseModel):
    task: str
    status: Literal["ok", "declined"] = Field(
        description="ok: answered; declined: the gate found the image out of distribution or ungradable, so no "
        "labels, probabilities, confidence or referral are given (the image was valid; the model declines)"
    )
    labels: list[str] = Field(description="decided labels at the operating point (multi-label: possibly none)")
    label: str | None = Field(None, description="the decided class of a single-label task")
    probabilities: dict[str, float] = Field(description="calibrated probabilities (empty when declined)")
    referral: bool | None = Field(
        description="refer at the operating point; null: declined, or the task has no referral rule"
    )
    confidence: float | None = Field(
        description="calibrated top probability (multi-label: of the least sure label); null when declined"
    )
    needs_review: bool = Field(description="confidence below the service's review level, or declined")
    gate: GateAnswer = Field(description="the gate's verdict on this image")
    operating_point: dict[str, Any] | None = Field(description="rule and threshold(s) used, and where they come from")
    bundle_version: str
    batch_size: int = Field(description="requests scored in the same model call as this one")


class VolumePrediction(BaseModel):
    """The answer for an uploaded OCT volume (a multi-frame DICOM): each B-scan scored as one image,
    one answer by the rule in `rule` (`eyeray.decision.volume`)."""

    task: str
    status: Literal["ok", "declined"] = Field(
        description="ok: the volume is referred, or cleared with every B-scan answered; declined: some B-scans "
        "could not be answered and none of the others was referred, so no answer is given"
    )
    labels: list[str] = Field(description="the top driving (cleared: the closest) B-scan's labels; none when declined")
    probabilities: dict[str, float] = Field(description="that B-scan's calibrated probabilities")
    referral: bool | None = Field(description="refer: any B-scan referred; null when declined or no referral rule")
    needs_review: bool
    driving_frames: list[int] = Field(
        description="B-scans (0-based frames) behind the answer, the most severe first: the referred ones, or "
        "when declined the unanswered ones; none for a cleared volume"
    )
    closest_frame: int | None = Field(
        description="the answered B-scan closest to referral (its labels: a cleared volume's)"
    )
    reason: str = Field(description="the answer in words, e.g. '3 of 49 B-scans referred: frames 20, 21, 19'")
    rule: str = Field(description="how B-scans make the volume's answer")
    frames: int
    answered: int
    declined: int
    errors: int
    bscans: list[dict[str, Any]] = Field(
        description="each B-scan's answer with its `frame`, as /predict answers one image; one that could not "
        "be decoded has status error and `error`"
    )
    bundle_version: str


class Routed(BaseModel):
    status: Literal["ok", "out_of_scope"] = Field(
        description="ok: at least one task answered; out_of_scope: no task's gate accepted the image"
    )
    answers: list[Prediction] = Field(
        description="one answer per task whose gate accepted the image (and, for DICOM, whose modality its header "
        "names), as POST /v1/{task}/predict gives it; a fundus photo can get glaucoma and ODIR answers"
    )
    reason: str = Field(description="out_of_scope: each task's verdict; empty otherwise")


class Explanation(Prediction):
    explained_class: str = Field(description="the class the heatmap explains")
    overlay_png: str = Field(description="base64 PNG: the Grad-CAM heatmap over the uploaded image, at its size")


class Problem(BaseModel):
    """The body of every error response (4xx and 5xx alike), so a client reads one shape."""

    detail: str = Field(description="why, in words")
