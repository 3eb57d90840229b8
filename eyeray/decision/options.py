"""How a bundle's calibrated probabilities become an answer, as one object that every route takes:
`eyeray score` (`ScoreConfig.decision`), Serve (`ServeArgs.decision`, and per request where the API
allows), the scoring actors (`BundlePredictor`), the Serve replicas (`TaskModel`) and `eyeray
explain`. Each setting's default and help are written here once; the flags of every command are
generated from these fields (`eyeray.config_cli`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from eyeray.decision.decide import DEFAULT_REVIEW_BELOW
from eyeray.decision.operating_points import parse_thresholds

ON_OFF = {"on": True, "off": False}


def on_off(text: str) -> bool:
    """The value of an on/off flag (`--gate off`)."""
    if text not in ON_OFF:
        raise ValueError(f"write on or off, not {text!r}")
    return ON_OFF[text]


@dataclass(frozen=True)
class DecisionOptions:
    """The operating point override, the review level and the gate: what decides an answer beyond
    the bundle's manifest. The defaults are the bundle's own decisions."""

    thresholds: str | None = field(  # as typed: "0.3", "0.3,0.4", "D=0.3,G=0.2"
        default=None,
        metadata={
            "metavar": "T",
            "help": "override the bundle's operating point: 0.3 (referral rules), 0.3,0.4,... (one per label) "
            "or LABEL=0.3,LABEL=0.2 (default: the thresholds chosen on validation data)",
        },
    )
    review_below: float = field(
        default=DEFAULT_REVIEW_BELOW,
        metadata={"help": "calibrated confidence below which an answer is marked needs_review"},
    )
    gate: bool = field(
        default=True,
        metadata={
            "type": on_off,
            "spell": lambda value: "on" if value else "off",
            "metavar": "{on,off}",
            "help": "on: an image the bundle's gate finds out of distribution or ungradable gets no diagnosis "
            "(status declined, in the review queue); off: every decoded image is answered",
        },
    )

    def __post_init__(self):
        parse_thresholds(self.thresholds)  # a typo fails where the options are made, not in an actor
        if not isinstance(self.gate, bool):  # "off" would be true: a gate silently on
            raise TypeError(f"gate is True or False (on the command line: --gate on or off), not {self.gate!r}")
        if not 0.0 <= self.review_below <= 1.0:
            raise ValueError(f"review_below must be between 0 and 1, not {self.review_below}")

    @property
    def override(self) -> float | list[float] | dict[str, float] | None:
        """The parsed threshold override (`eyeray.decision.operating_points.parse_thresholds`)."""
        return parse_thresholds(self.thresholds)

    def with_thresholds(self, thresholds: str | None) -> DecisionOptions:
        """These options with another override (a request's `?thresholds=`)."""
        return replace(self, thresholds=thresholds)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults, by name: what changes a result's rows."""
        default = DecisionOptions()
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) != getattr(default, f.name)}
