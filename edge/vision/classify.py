"""Classification stage: cell crops through the int8 bundle, calibrated confidence, "unidentified"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hematovision.classes import UNIDENTIFIED
from hematovision.crop import cut_crops
from hematovision.stain import standardise_crops

from .locate import LocatedCell, locate_cell
from .model_bundle import Bundle


@dataclass(frozen=True)
class Prediction:
    """One cell's class: `label` is "unidentified" when the confidence is below the bundle's threshold,
    or when the cell is unlike the training cells (`unfamiliar`), whatever its softmax says."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    novelty: float | None = None  # the novelty score, for a bundle with a novelty model
    unfamiliar: bool = False

    @property
    def identified(self) -> bool:
        return self.label != UNIDENTIFIED


def temperature_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predictions_from_logits(logits: np.ndarray, bundle: Bundle, features: np.ndarray | None = None) -> list[Prediction]:
    """Temperature-scaled probabilities; below the threshold, or with features far from every
    training class (the bundle's novelty model), a cell is "unidentified"."""
    probs = temperature_softmax(logits, bundle.temperature)
    scores = bundle.novelty.scores(features) if bundle.novelty is not None and features is not None else None
    out = []
    for i, row in enumerate(probs):
        best = int(row.argmax())
        confidence = float(row[best])
        novelty = float(scores[i]) if scores is not None else None
        unfamiliar = novelty is not None and novelty > bundle.novelty.threshold
        label = bundle.classes[best] if confidence >= bundle.threshold and not unfamiliar else UNIDENTIFIED
        out.append(Prediction(label, confidence, {c: float(p) for c, p in zip(bundle.classes, row)}, novelty, unfamiliar))
    return out


def classify_crops(bundle: Bundle, crops: np.ndarray) -> list[Prediction]:
    """Classify (N, S, S, 3) RGB uint8 crops in one batch, after the bundle's colour standardisation."""
    logits, features = bundle.logits(standardise_crops(crops, bundle.colour))
    return predictions_from_logits(logits, bundle, features)


def cut_cells(image: np.ndarray, centers, um_per_pixel: float, bundle: Bundle) -> np.ndarray:
    """Crops of the cells at `centers` with the bundle's crop geometry, stacked (N, S, S, 3)."""
    return cut_crops(image, list(centers), um_per_pixel, bundle.geometry)


def classify_cell_image(bundle: Bundle, image: np.ndarray, um_per_pixel: float | None = None,
                        name: str = "image") -> tuple[LocatedCell, Prediction]:
    """Classify the white cell an image was taken of (`locate_cell`), cut as the device cuts it.

    Raises NoCellFound when no white cell covers the image centre, DataError for an unreadable frame.
    """
    cell = locate_cell(image, um_per_pixel, name=name)
    crop = cut_cells(image, [cell.detection.center], cell.um_per_pixel, bundle)
    return cell, classify_crops(bundle, crop)[0]
