"""What is wrong with a specimen and what to do: flags from its cells, frames, colours and scale."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hematovision.calibration.colour import SUMMARY_KEYS

from ..config import ChecksConfig
from ..vision.bundle_meta import StainRange
from .tally import Tally

OUTSIDE_TRAINING = "outside_training"
DIFFERENTIAL_REVIEW = "differential_review"
TOO_MANY_UNIDENTIFIED = "too_many_unidentified"
LOW_FOCUS = "low_focus"
TARGET_NOT_REACHED = "target_not_reached"

# Severities, mildest first; a specimen's flags are listed worst first.
INFO, REVIEW, FULL_REVIEW = "info", "review", "full_review"
SEVERITIES = (INFO, REVIEW, FULL_REVIEW)
SEVERITY = {OUTSIDE_TRAINING: FULL_REVIEW, DIFFERENTIAL_REVIEW: REVIEW, TOO_MANY_UNIDENTIFIED: REVIEW,
            LOW_FOCUS: REVIEW, TARGET_NOT_REACHED: INFO}
FULL_REVIEW_BANNER = "Needs full review: every cell must be verified"

# Adult reference intervals of the differential, percent of the identified white cells. A class whose
# whole 95% interval lies outside its range is flagged for review; its count is never changed.
ADULT_REFERENCE_PERCENT = {"neutrophil": (40.0, 75.0), "lymphocyte": (20.0, 45.0), "monocyte": (2.0, 10.0),
                           "eosinophil": (1.0, 6.0), "basophil": (0.0, 2.0)}
# A training lab's colour spread is never taken as narrower than this (Lab units): a lab of very few
# images would otherwise hold every specimen to its exact colour.
STAIN_SD_FLOOR = 0.5
# The colour summary's channels (calibration.colour.SUMMARY_KEYS) in a technician's words.
CHANNEL_WORDS = dict(zip(SUMMARY_KEYS, ("lightness", "red tint (a*)", "yellow tint (b*)",
                                        "contrast (spread of lightness)", "spread of red tint", "spread of yellow tint")))
# Messages for codes met without one: reports written before flags had messages, commissioning tests.
PLAIN_MESSAGES = {
    OUTSIDE_TRAINING: "Outside what the model was validated on. Verify every cell before reporting.",
    DIFFERENTIAL_REVIEW: "Differential far outside the adult reference intervals: review the slide before reporting.",
    TOO_MANY_UNIDENTIFIED: "Many cells are unidentified: verify them in the gallery before reporting.",
    LOW_FOCUS: "Most frames were too blurred to count: focus the microscope and count again.",
    TARGET_NOT_REACHED: "Fewer cells identified than the target: count more fields before reporting.",
    "commissioning_test_not_a_patient": "Commissioning test of the link: not a patient's result.",
}


@dataclass(frozen=True)
class Flag:
    """One thing wrong with a specimen: a stable code, a message a technician acts on, its severity."""

    code: str
    message: str
    severity: str

    @classmethod
    def of(cls, code: str, message: str | None = None) -> Flag:
        """A flag with its code's severity; without a message, the code's plain one."""
        return cls(code, message or PLAIN_MESSAGES.get(code, code.replace("_", " ").capitalize() + "."),
                   SEVERITY.get(code, REVIEW))

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class ColourSums:
    """Running sums of the used frames' colour summaries (SUMMARY_KEYS), so the mean survives restarts."""

    frames: int = 0
    sums: tuple[float, ...] = (0.0,) * len(SUMMARY_KEYS)

    def add(self, summary) -> ColourSums:
        return ColourSums(self.frames + 1, tuple(a + float(b) for a, b in zip(self.sums, summary)))

    @property
    def mean(self) -> tuple[float, ...] | None:
        return tuple(v / self.frames for v in self.sums) if self.frames else None


@dataclass(frozen=True)
class Evidence:
    """What a specimen's checks look at, accumulated frame by frame while it is counted."""

    tally: Tally
    classified: int = 0  # cells through the classifier (rejected ones too)
    unfamiliar: int = 0  # of those, unlike every training class (bundles with a novelty model)
    frames_used: int = 0
    frames_blur: int = 0
    frames_motion: int = 0
    colour: ColourSums = ColourSums()
    um_per_pixel: float | None = None  # the pixel size of the latest used frame


@dataclass(frozen=True)
class TrainingRange:
    """What a bundle's model was trained on: each lab's colour, the pixel size, whether it scores novelty."""

    stain: tuple[StainRange, ...] = ()
    um_per_pixel: float | None = None
    novelty: bool = False

    @classmethod
    def of(cls, bundle) -> TrainingRange:
        return cls(bundle.stain_range, bundle.trained_um_per_pixel, bundle.novelty is not None)


@dataclass(frozen=True)
class Cause:
    """One reason a specimen is outside the training range, and its fix."""

    finding: str
    fix: str


def specimen_flags(evidence: Evidence, training: TrainingRange = TrainingRange(),
                   limits: ChecksConfig = ChecksConfig()) -> tuple[Flag, ...]:
    """Every flag the evidence raises, worst first."""
    found = (outside_training(evidence, training, limits), differential_review(evidence.tally),
             too_many_unidentified(evidence.tally, limits), low_focus(evidence, limits),
             target_not_reached(evidence.tally))
    return tuple(sorted((f for f in found if f is not None), key=lambda f: -SEVERITIES.index(f.severity)))


def worst(flags) -> Flag | None:
    """The most severe flag (the first of those as severe), or None."""
    return max(flags, key=lambda f: SEVERITIES.index(f.severity), default=None)


def outside_training(evidence: Evidence, training: TrainingRange, limits: ChecksConfig) -> Flag | None:
    """The specimen is outside what the model was validated on: many unfamiliar cells, stain colours or
    a pixel size outside the training range. The message names each cause and its fix."""
    causes = [c for c in (unfamiliar_cause(evidence, training, limits), stain_cause(evidence, training, limits),
                          scale_cause(evidence, training, limits)) if c is not None]
    if not causes:
        return None
    findings, fixes = "; ".join(c.finding for c in causes), "; ".join(dict.fromkeys(c.fix for c in causes))
    return Flag.of(OUTSIDE_TRAINING, f"Outside what the model was validated on: {findings}. "
                                     f"Verify every cell before reporting; {fixes}.")


def unfamiliar_cause(evidence: Evidence, training: TrainingRange, limits: ChecksConfig) -> Cause | None:
    if not training.novelty or evidence.classified < limits.min_cells_for_unfamiliar:
        return None
    share = evidence.unfamiliar / evidence.classified
    if share <= limits.max_unfamiliar_share:
        return None
    return Cause(f"{_percent(share)} of cells ({evidence.unfamiliar} of {evidence.classified}) look unlike the "
                 "training cells", "check the stain and the smear, and look for abnormal cells")


def stain_distance(mean, lab: StainRange) -> tuple[float, ...]:
    """Per channel, how many of the lab's standard deviations `mean` lies from the lab's mean."""
    return tuple(abs(m - c) / max(sd, STAIN_SD_FLOOR) for m, c, sd in zip(mean, lab.mean, lab.sd))


def stain_cause(evidence: Evidence, training: TrainingRange, limits: ChecksConfig) -> Cause | None:
    """The frames' mean colour lies farther than the limit (in any channel) from every training lab."""
    mean = evidence.colour.mean
    if mean is None or not training.stain:
        return None
    lab = min(training.stain, key=lambda r: max(stain_distance(mean, r)))
    distance = stain_distance(mean, lab)
    if max(distance) <= limits.stain_sd_limit:
        return None
    k = limits.stain_sd_limit
    shown = [f"{CHANNEL_WORDS[key]} {mean[i]:.0f}, trained {_span(lab.mean[i], max(lab.sd[i], STAIN_SD_FLOOR) * k)}"
             for i, key in enumerate(SUMMARY_KEYS) if distance[i] > k]
    nearest = f"nearest training lab {lab.lab}: " if len(training.stain) > 1 else ""
    return Cause(f"stain colours outside the training range ({nearest}{'; '.join(shown)})",
                 "calibrate colour (hematovision-calibrate colour) or check the stain and the lamp")


def scale_cause(evidence: Evidence, training: TrainingRange, limits: ChecksConfig) -> Cause | None:
    """The cells are imaged coarser than trained (a lower magnification): their crops are upsampled."""
    um, trained = evidence.um_per_pixel, training.um_per_pixel
    if not um or not trained or not math.isfinite(um) or um / trained <= limits.max_pixel_size_ratio:
        return None
    return Cause(f"cells imaged {um / trained:.1f}x coarser than the model was trained at ({um:.3f} um per pixel, "
                 f"trained {trained:.3f}): a lower magnification",
                 "use the objective the model was trained with and measure the pixel size "
                 "(hematovision-calibrate micrometer)")


def differential_review(tally: Tally, intervals=ADULT_REFERENCE_PERCENT) -> Flag | None:
    """Classes whose whole 95% interval lies outside the adult reference interval: flagged for review,
    never suppressed or changed (disease makes real extremes)."""
    far = [(c, intervals[c.name]) for c in tally.classes if c.name in intervals and tally.identified
           and (c.ci95[1] < intervals[c.name][0] or c.ci95[0] > intervals[c.name][1])]
    if not far:
        return None
    parts = [f"{c.name}s {c.percent:.0f}% (95% CI {c.ci95[0]:.0f}-{c.ci95[1]:.0f}; adult reference {lo:g}-{hi:g}%)"
             for c, (lo, hi) in far]
    return Flag.of(DIFFERENTIAL_REVIEW, f"Differential far outside the adult reference intervals: {', '.join(parts)}. "
                                        "Review the slide before reporting; the counts are as found, not changed.")


def too_many_unidentified(tally: Tally, limits: ChecksConfig) -> Flag | None:
    cells = tally.total - tally.rejected_total  # rejected detections must not dilute the share
    if not cells or tally.unidentified / cells <= limits.max_unidentified_share:
        return None
    return Flag.of(TOO_MANY_UNIDENTIFIED, f"{tally.unidentified} of {cells} counted cells "
                                          f"({_percent(tally.unidentified / cells)}) are unidentified, more than "
                                          f"{_percent(limits.max_unidentified_share)}: verify them in the gallery "
                                          "before reporting.")


def low_focus(evidence: Evidence, limits: ChecksConfig) -> Flag | None:
    seen = evidence.frames_used + evidence.frames_blur + evidence.frames_motion
    if not seen or not evidence.frames_blur or evidence.frames_used / seen >= limits.min_used_frame_share:
        return None
    return Flag.of(LOW_FOCUS, f"Only {evidence.frames_used} of {seen} frames were sharp enough to count "
                              f"({evidence.frames_blur} blurred): focus the microscope (hematovision-calibrate "
                              "focus) and count again.")


def target_not_reached(tally: Tally) -> Flag | None:
    if tally.target_reached:
        return None
    return Flag.of(TARGET_NOT_REACHED, f"Only {tally.identified} of the {tally.target} target cells were "
                                       "identified: count more fields before reporting the differential.")


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def _span(centre: float, half: float) -> str:
    lo, hi = centre - half, centre + half
    return f"{lo:.0f} to {hi:.0f}" if lo < 0 else f"{lo:.0f}-{hi:.0f}"
