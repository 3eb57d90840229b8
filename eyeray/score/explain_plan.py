"""Which cases get a Grad-CAM explanation, and of which class: plain data, no Keras.

Batch scoring decides this in its driver (to check `--explain` before any work starts) and in
its model actors; `eyeray.model.gradcam` draws the maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eyeray.decision.decide import explained_class


@dataclass(frozen=True)
class ExplainPlan:
    """Which scored rows get Grad-CAM overlays (`--explain`): "none"; "review" (rows that need
    review, the default, so the review queue shows overlays); "referred"; "top-K" (every row, its
    K most probable classes); or several joined by commas ("referred,review")."""

    review: bool = True
    referred: bool = False
    top_k: int = 0

    @classmethod
    def parse(cls, text: str) -> ExplainPlan:
        parts = {p.strip().lower() for p in str(text).split(",") if p.strip()}
        if parts in ({"none"}, set()):
            return cls(review=False)
        top = [p for p in parts if p.startswith("top-")]
        unknown = parts - {"review", "referred", *top}
        if unknown or len(top) > 1 or (top and not top[0][4:].isdigit()) or (top and int(top[0][4:]) < 1):
            raise ValueError(f"--explain {text!r}: use none, review, referred, top-K (K >= 1), or a comma list")
        return cls(review="review" in parts, referred="referred" in parts, top_k=int(top[0][4:]) if top else 0)

    @property
    def active(self) -> bool:
        return self.review or self.referred or self.top_k > 0

    def pairs(
        self, decision, needs_review: np.ndarray, classes: Sequence[str], in_volume: np.ndarray | None = None
    ) -> list[tuple[int, int]]:
        """(row, class index) to explain: top-K classes of every answered row, else the explained
        class of the answered rows selected (referred and/or needing review). `in_volume`: rows that
        are a volume's B-scans, whose referred ones are always explained (they drive the volume's
        answer, `eyeray.decision.volume`) while the plan is active."""
        n, answered = len(decision.labels), ~decision.declined  # a declined image has no class to explain
        if self.top_k:
            order = np.argsort(-decision.probabilities, axis=1)[:, : self.top_k]
            return [(int(i), int(k)) for i in np.flatnonzero(answered) for k in order[i]]
        refer = decision.referral if decision.referral is not None else np.zeros(n, bool)
        driving = refer & (in_volume if in_volume is not None else np.zeros(n, bool))
        chosen = ((self.review & needs_review) | (self.referred & refer) | driving) & answered
        return [(int(i), explained_class(decision, int(i), classes)) for i in np.flatnonzero(chosen)]
