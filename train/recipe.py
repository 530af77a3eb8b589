"""The training recipe: frozen feature extraction, then fine-tuning, resumable from checkpoints."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import keras

from hematovision.classes import DEFAULT_CLASSES, validate_class_list
from hematovision.crop import CropGeometry
from hematovision.errors import DataError, ModelInvalid
from hematovision.stain import STANDARDS, ColourStandard

from .augment import AUGMENT_MODES
from .batches import class_weights, make_sequence
from .datasets import Dataset, lab_of
from .model import build_classifier, freeze_backbone, unfreeze_top
from .splits import SplitPlan, make_manifest, read_manifest, samples_of, split_counts, write_manifest

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multiworker")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; stored as the run folder's config.json."""

    backbone: str = "efficientnet_b0"
    weights: str = "imagenet"
    classes: tuple[str, ...] = DEFAULT_CLASSES
    input_size: int = 224
    crop_side_um: float = 24.0
    batch_size: int = 32
    head_epochs: int = 8
    finetune_epochs: int = 22
    head_lr: float = 1e-3
    finetune_lr: float = 1e-4
    finetune_fraction: float = 0.3
    label_smoothing: float = 0.05
    dropout: float = 0.3
    patience: int = 5
    augment: str = "full"  # a mode of AUGMENT_MODES (train/augment.py)
    colour: str = "none"  # standardisation of every crop: a name of hematovision.stain.STANDARDS
    lab_repeat_max: int = 1  # a smaller lab's training cells repeat up to this often per epoch (1: never)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    strategy: str = "default"

    @property
    def geometry(self) -> CropGeometry:
        return CropGeometry(self.crop_side_um, self.input_size)

    @property
    def colour_standard(self) -> ColourStandard:
        return STANDARDS[self.colour]

    def validate(self) -> "TrainConfig":
        """Raises DataError naming the setting that is out of range."""
        validate_class_list(self.classes, "--classes")
        checks = {"input_size": self.input_size >= 32, "batch_size": self.batch_size >= 1,
                  "crop_side_um": self.crop_side_um > 0, "strategy": self.strategy in STRATEGIES,
                  "augment": self.augment in AUGMENT_MODES, "colour": self.colour in STANDARDS,
                  "finetune_fraction": 0 <= self.finetune_fraction <= 1,
                  "lab_repeat_max": 1 <= self.lab_repeat_max <= 20,
                  "head_epochs": self.head_epochs >= 1, "finetune_epochs": self.finetune_epochs >= 0}
        for key, ok in checks.items():
            if not ok:
                raise DataError(f"training setting {key}={getattr(self, key)!r} is out of range")
        return self

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        """Raises ModelInvalid when `path` is missing (not a run folder), not JSON, or unknown settings."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ModelInvalid(f"{path.parent}: not a training run folder (no {path.name}); give the folder "
                               "hematovision-train fit --out wrote") from err
        except (OSError, ValueError) as err:
            raise ModelInvalid(f"{path}: cannot be read as a run's settings ({err}); train the run again") from err
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ModelInvalid(f"{path}: unknown settings {sorted(unknown)}")
        raw["classes"] = tuple(raw["classes"])
        if isinstance(raw.get("augment"), bool):  # runs made before the modes existed
            raw["augment"] = "full" if raw["augment"] else "none"
        return cls(**raw).validate()


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files."""

    root: Path

    config = property(lambda self: self.root / "config.json")
    manifest = property(lambda self: self.root / "manifest.csv")
    skipped = property(lambda self: self.root / "skipped.txt")
    data = property(lambda self: self.root / "data.json")
    history = property(lambda self: self.root / "history.csv")
    head_model = property(lambda self: self.root / "phase1_head.keras")
    model = property(lambda self: self.root / "model.keras")

    def backup(self, phase: int) -> Path:
        return self.root / "checkpoints" / f"phase{phase}"


def prepare_run(run: RunPaths, config: TrainConfig, data: Dataset, test_groups: set[str] | None = None,
                test_source: str | None = None) -> None:
    """Create the run folder: config, grouped manifest, skipped list, data provenance.

    `test_groups`, when given (a cross-validation fold, or the BCCD fields a Kaggle test set was
    made from), fixes the test split; val is drawn from the rest. data.json records them and
    `test_source`, where they came from.
    """
    run.root.mkdir(parents=True, exist_ok=True)
    samples = [s for s in data.samples if s.label in config.classes]
    _check_classes(samples, config.classes)
    rows = make_manifest(samples, SplitPlan(config.val_fraction, config.test_fraction, config.seed), test_groups)
    digest = write_manifest(rows, run.manifest)
    run.skipped.write_text("".join(f"{s.path}\t{s.reason}\n" for s in data.skipped))
    provenance = {"sources": data.sources, "manifest_sha256": digest, "counts": split_counts(rows),
                  "skipped": len(data.skipped)}
    if test_groups is not None:
        provenance["test_groups"] = {"source": test_source, "groups": sorted(test_groups)}
    run.data.write_text(json.dumps(provenance, indent=2))
    run.config.write_text(json.dumps(asdict(config), indent=2))
    logger.info("run %s: %s; %d inputs skipped (listed in %s)", run.root, provenance["counts"],
                len(data.skipped), run.skipped.name)


def _check_classes(samples, classes) -> None:
    present = {s.label for s in samples}
    missing = [c for c in classes if c not in present]
    if missing:
        raise DataError(f"no samples of class {', '.join(missing)}; add data or drop it with --classes")


def make_strategy(name: str):
    """The tf.distribute strategy: default (one device, GPU if present), mirrored, multi-worker."""
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def balance_labs(samples: list, repeat_max: int) -> list:
    """The training cells with each smaller lab's repeated toward the largest lab's count (at most
    `repeat_max` times), so a lab with few cells is not drowned out by one with many."""
    by_lab: dict[str, list] = {}
    for s in samples:
        by_lab.setdefault(lab_of(s), []).append(s)
    largest = max((len(v) for v in by_lab.values()), default=0)
    out = []
    for lab, cells in sorted(by_lab.items()):
        repeats = max(1, min(repeat_max, round(largest / len(cells))))
        out += cells * repeats
        if repeats > 1:
            logger.info("lab %s: %d training cells, each %d times per epoch", lab, len(cells), repeats)
    return out


def train(run: RunPaths) -> Path:
    """Train (or resume) the run in `run.root`; returns the final model path."""
    config = TrainConfig.load(run.config)
    if run.model.is_file():
        logger.info("%s already finished; nothing to do", run.root)
        return run.model
    keras.utils.set_random_seed(config.seed)  # head initialisation and dropout follow the run's seed
    rows = read_manifest(run.manifest)
    train_s, val_s = balance_labs(samples_of(rows, "train"), config.lab_repeat_max), samples_of(rows, "val")
    if not val_s:
        raise DataError("the validation split is empty; give more groups per class")
    augment = AUGMENT_MODES[config.augment]
    train_seq = make_sequence(train_s, config.classes, config.geometry, config.batch_size, augment, config.seed,
                              config.colour_standard)
    val_seq = make_sequence(val_s, config.classes, config.geometry, config.batch_size, None, config.seed,
                            config.colour_standard)
    weights = class_weights(train_s, config.classes)
    strategy = make_strategy(config.strategy)
    with strategy.scope():
        model = _phase_one(run, config, train_seq, val_seq, weights)
        _phase_two(run, config, model, train_seq, val_seq, weights)
    return run.model


def _phase_one(run, config, train_seq, val_seq, weights):
    if run.head_model.is_file():
        logger.info("phase 1 done earlier: loading %s", run.head_model.name)
        return keras.models.load_model(run.head_model)
    model = build_classifier(config.backbone, config.weights, len(config.classes),
                             config.input_size, config.dropout)
    freeze_backbone(model)
    _compile(model, config.head_lr, config)
    _fit(model, run, 1, config.head_epochs, train_seq, val_seq, weights, config)
    model.save(run.head_model)
    return model


def _phase_two(run, config, model, train_seq, val_seq, weights) -> None:
    if config.finetune_epochs and config.finetune_fraction > 0:
        unfreeze_top(model, config.finetune_fraction)
        _compile(model, config.finetune_lr, config)
        _fit(model, run, 2, config.finetune_epochs, train_seq, val_seq, weights, config)
    tmp = run.model.with_name("model.partial.keras")
    model.save(tmp)
    tmp.replace(run.model)


def _compile(model, lr: float, config: TrainConfig) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def _fit(model, run, phase, epochs, train_seq, val_seq, weights, config) -> None:
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run.backup(phase))),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
        keras.callbacks.CSVLogger(str(run.history), append=True),
        ProgressLog(phase, epochs),
    ]
    model.fit(train_seq, validation_data=val_seq, epochs=epochs, class_weight=weights,
              callbacks=callbacks, verbose=0)


class ProgressLog(keras.callbacks.Callback):
    """Logs each epoch's figures, the elapsed time and an estimate of the time left."""

    def __init__(self, phase: int, epochs: int):
        super().__init__()
        self.phase, self.epochs = phase, epochs
        self.start = time.monotonic()
        self.first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1 - self.first_epoch
        elapsed = time.monotonic() - self.start
        left = elapsed / max(done, 1) * (self.epochs - epoch - 1)
        figures = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        logger.info("phase %d epoch %d/%d %s | %.0fs elapsed, at most %.0fs left",
                    self.phase, epoch + 1, self.epochs, figures, elapsed, left)
