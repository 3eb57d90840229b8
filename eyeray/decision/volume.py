"""One answer per OCT volume from the answers of its B-scans: the same rule for batch scoring and
Serve, over the per-B-scan decisions (calibrated probabilities, the operating point's referral,
the gate's verdict) that `decide` already made.

The rule (`RULE`), chosen so a volume is never cleared on less evidence than its B-scans give:
- refer when any B-scan is referred; the driving B-scans are the referred ones, the highest
  referral score (e.g. P(CNV) + P(DME), calibrated) first; the volume's labels are the top one's;
- clear (status ok, not referred) only when every B-scan was answered and none was referred: no
  B-scan drives that answer (each was below the threshold); the one closest to referral is named
  (`closest`), and its labels are the volume's (the most severe finding short of referral);
- otherwise, declined: some B-scans could not be answered (the gate declined them, or they failed
  to decode) and none of the others was referred, so nobody can say the volume is clear.
A task without a referral rule answers with its most confident B-scan (`closest`), on the same
conditions. Grad-CAM is drawn for every referred B-scan of a volume (`eyeray.score.explain_plan`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

RULE = (
    "refer if any B-scan is referred (calibrated probabilities at the operating point); the referred "
    "B-scans drive the answer, highest referral score first; cleared only if every B-scan was answered "
    "and none referred (the closest to referral named); else declined for review"
)
NAMED = 5  # driving B-scans named in a reason or a report line; the full list stays in the rows


@dataclass(frozen=True)
class BScan:
    """What was decided for one B-scan (a frame of the volume)."""

    frame: int
    status: str  # ok, declined or error
    labels: tuple[str, ...] = ()
    probabilities: Mapping[str, float] = field(default_factory=dict)
    referral: bool | None = None
    needs_review: bool = False
    reason: str = ""  # declined or error: why


def from_answer(frame: int, answer: dict) -> BScan:
    """A B-scan from its answer as the decision layer gives it (`Decision.answer`: what Serve returns
    for one image), or from {"status": "error", "error": reason} for one that could not be decoded."""
    gate = answer.get("gate") or {}
    reason = answer.get("error") or (f"{gate.get('verdict')}: {gate.get('reason')}" if gate.get("reason") else "")
    return BScan(
        frame,
        answer["status"],
        tuple(answer.get("labels") or ()),
        answer.get("probabilities") or {},
        answer.get("referral"),
        bool(answer.get("needs_review")),
        reason or str(gate.get("verdict") or ""),
    )


@dataclass(frozen=True)
class VolumeAnswer:
    status: str  # ok, declined or error
    labels: tuple[str, ...]
    referral: bool | None
    driving: tuple[int, ...]  # frames, most severe first
    needs_review: bool
    reason: str
    frames: int
    answered: int
    declined: int
    errors: int
    probabilities: Mapping[str, float] = field(default_factory=dict)  # the top driving (or closest) B-scan's
    closest: int | None = None  # the answered B-scan closest to referral (most confident: no referral rule)

    def answer(self) -> dict:
        """As JSON: what the API and the scoring's volume rows say."""
        return {
            "status": self.status,
            "labels": list(self.labels),
            "referral": self.referral,
            "driving_frames": list(self.driving),
            "closest_frame": self.closest,
            "needs_review": self.needs_review,
            "reason": self.reason,
            "frames": self.frames,
            "answered": self.answered,
            "declined": self.declined,
            "errors": self.errors,
            "probabilities": dict(self.probabilities),
            "rule": RULE,
        }


def severity(scan: BScan, referral_classes: Sequence[str]) -> float:
    """How close a B-scan is to referral: its calibrated referral score (the referral classes'
    probabilities summed); without a referral rule, its top probability."""
    if referral_classes:
        return float(sum(scan.probabilities.get(c, 0.0) for c in referral_classes))
    return max(scan.probabilities.values(), default=0.0)


def aggregate(scans: Sequence[BScan], referral_classes: Sequence[str] = ()) -> VolumeAnswer:
    """The volume's answer from its B-scans' (`RULE`)."""
    answered = [s for s in scans if s.status == "ok"]
    counts = Counter(s.status for s in scans)
    tally = {"frames": len(scans), "answered": len(answered), "declined": counts["declined"], "errors": counts["error"]}
    ranked = sorted(answered, key=lambda s: (-severity(s, referral_classes), s.frame))
    referred = [s for s in ranked if s.referral]
    has_rule = bool(referral_classes) or any(s.referral is not None for s in answered)
    tally["closest"] = ranked[0].frame if ranked else None
    if referred:
        top = referred[0]
        return VolumeAnswer(
            "ok",
            top.labels,
            True,
            tuple(s.frame for s in referred),
            any(s.needs_review for s in referred),
            f"{len(referred)} of {len(scans)} B-scans referred: {_frames(referred)}",
            probabilities=top.probabilities,
            **tally,
        )
    unanswered = [s for s in scans if s.status != "ok"]
    if not unanswered and ranked:
        top = ranked[0]
        return VolumeAnswer(
            "ok",
            top.labels,
            False if has_rule else None,
            (),
            any(s.needs_review for s in answered),
            f"none of {len(scans)} B-scans referred; closest: frame {top.frame}"
            if has_rule
            else f"most confident of {len(scans)} B-scans: frame {top.frame}",
            probabilities=top.probabilities,
            **tally,
        )
    why = Counter(s.reason or s.status for s in unanswered).most_common()
    status = "error" if not answered and not counts["declined"] else "declined"
    return VolumeAnswer(
        status,
        (),
        None,
        tuple(s.frame for s in unanswered),
        True,
        f"{len(unanswered)} of {len(scans)} B-scans not answered ("
        + "; ".join(f"{n} {reason}" for reason, n in why[:3])
        + (f"; {len(why) - 3} other reasons" if len(why) > 3 else "")
        + ("), none of the others referred" if answered else ")"),
        **tally,
    )


def _frames(scans: Sequence[BScan]) -> str:
    named = ", ".join(str(s.frame) for s in scans[:NAMED])
    return f"frames {named}" + (f" and {len(scans) - NAMED} more" if len(scans) > NAMED else "")
