"""What an exported model is judged by: float and int8 outputs per split and per lab, and its abstentions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hematovision.edge.vision.model_bundle import Int8Model
from hematovision.novelty import NoveltyModel
from hematovision.train.batches import crops_array
from hematovision.train.datasets import lab_of
from hematovision.pixels import model_input
from hematovision.train.evaluate import compute_metrics, softmax


@dataclass(frozen=True)
class Evaluation:
    """Float and int8 outputs on one split (int8 features when the model has them), and each cell's lab."""

    y: np.ndarray
    float_logits: np.ndarray
    int8_logits: np.ndarray
    int8_features: np.ndarray | None
    labs: np.ndarray
    float_features: np.ndarray | None = None  # the float model's pooled features, when measured


    def of_lab(self, lab: str) -> "Evaluation":
        keep = self.labs == lab
        pick = (lambda a: a[keep] if a is not None else None)
        return Evaluation(self.y[keep], self.float_logits[keep], self.int8_logits[keep], pick(self.int8_features),
                          self.labs[keep], pick(self.float_features))


def int8_outputs(int8: Int8Model, crops: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and features (None without a feature output) of crops, in batches."""
    parts = [int8.run(crops[i:i + batch]) for i in range(0, len(crops), batch)]
    logits = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, int8.n_outputs), np.float32)
    features = np.concatenate([p[1] for p in parts]) if parts and parts[0][1] is not None else None
    return logits, features


def evaluate_split(keras_model, int8: Int8Model, samples, config) -> Evaluation:
    """Float and int8 outputs of un-augmented crops, cut and standardised as the device does.
    `keras_model` gives logits, or logits and pooled features (export.novelty.with_feature_output)."""
    y = np.array([config.classes.index(s.label) for s in samples])
    colour = config.colour_standard
    float_logits, float_features = float_outputs(keras_model, samples, config)
    logits, features = int8_outputs(int8, crops_array(samples, config.geometry, colour)) if samples else \
        (np.zeros((0, len(config.classes))), None)
    return Evaluation(y, float_logits, logits, features, np.array([lab_of(s) for s in samples]), float_features)


def float_outputs(keras_model, samples, config, batch: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (and pooled features, for a two-output model) of the float model, in batches."""
    logits, features = [], []
    for i in range(0, len(samples), batch):
        out = keras_model(model_input(crops_array(samples[i:i + batch], config.geometry, config.colour_standard)),
                          training=False)
        parts = out if isinstance(out, (list, tuple)) else [out]
        logits.append(np.asarray(parts[0]))
        if len(parts) > 1:
            features.append(np.asarray(parts[1]))
    if not logits:
        return np.zeros((0, len(config.classes))), None
    return np.concatenate(logits), (np.concatenate(features) if features else None)


def metrics_by_lab(test: Evaluation, classes) -> dict:
    """Float and int8 metrics of each laboratory in a split: a figure of one lab never stands for another."""
    return {lab: {kind: compute_metrics(softmax(getattr(test.of_lab(lab), f"{kind}_logits")),
                                        test.of_lab(lab).y, classes).to_dict() for kind in ("float", "int8")}
            for lab in sorted(set(test.labs))}


def abstentions(ev: Evaluation, temperature: float, threshold: float, novelty: NoveltyModel | None) -> dict:
    """How the int8 model abstains on a split: the share of cells given a class (coverage), the
    accuracy on those (selective accuracy), and why the others were left "unidentified"."""
    probs = softmax(ev.int8_logits, temperature)
    unsure = probs.max(axis=1) < threshold
    novel = novelty.is_novel(ev.int8_features) if novelty is not None and ev.int8_features is not None \
        else np.zeros(len(ev.y), bool)
    classified = ~(unsure | novel)
    correct = probs.argmax(axis=1) == ev.y
    return {"n": int(len(ev.y)), "coverage": _share(classified), "selective_accuracy": _share(correct[classified]),
            "accuracy_all": _share(correct), "unsure": _share(unsure), "novel": _share(novel),
            "novel_among_wrong": _share(novel[~correct]), "novel_among_right": _share(novel[correct])}


def abstentions_by_lab(ev: Evaluation, temperature: float, threshold: float, novelty: NoveltyModel | None) -> dict:
    return {lab: abstentions(ev.of_lab(lab), temperature, threshold, novelty) for lab in sorted(set(ev.labs))}


def _share(mask: np.ndarray) -> float | None:
    return float(np.mean(mask)) if len(mask) else None
