"""Cell crops and batches for training and evaluation, cut with the shared crop geometry."""

from __future__ import annotations

import functools
import math

import numpy as np

from hematovision.crop import NO_JITTER, CropGeometry, cut_crop
from hematovision.pixels import model_input, read_rgb
from hematovision.stain import NO_STANDARD, ColourStandard, standardise_crops

from .augment import NO_AUGMENT, AugmentParams, jitter_colour, random_jitter
from .datasets import Sample


@functools.lru_cache(maxsize=1024)
def _field(path: str) -> np.ndarray:
    image = read_rgb(path)
    image.setflags(write=False)
    return image


def sample_crop(sample: Sample, geometry: CropGeometry, rng: np.random.Generator | None = None,
                params: AugmentParams = NO_AUGMENT, colour: ColourStandard = NO_STANDARD) -> np.ndarray:
    """The RGB uint8 crop the model sees for a sample: the device's own crop geometry and colour
    standardisation, after any augmentation (as on the device, after the camera).

    A field sample is cut around its box centre at the field's pixel size; a whole-image
    sample (class folders) is taken as its central square.
    """
    image = _field(sample.path)
    jitter = random_jitter(rng, params) if rng is not None else NO_JITTER
    if sample.box is not None:
        crop = cut_crop(image, sample.center, sample.um_per_pixel, geometry, jitter)
    else:
        h, w = image.shape[:2]
        um = geometry.side_um / min(h, w)
        crop = cut_crop(image, ((w - 1) / 2.0, (h - 1) / 2.0), um, geometry, jitter)
    if rng is not None:
        crop = jitter_colour(crop, rng, params)
    return standardise_crops(crop, colour)


def crops_array(samples: list[Sample], geometry: CropGeometry, colour: ColourStandard = NO_STANDARD) -> np.ndarray:
    """Un-augmented crops of samples as the model sees them, stacked (N, S, S, 3) uint8."""
    return np.stack([sample_crop(s, geometry, colour=colour) for s in samples])


def one_hot(samples: list[Sample], classes: tuple[str, ...]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(samples), len(classes)), np.float32)
    y[np.arange(len(samples)), [index[s.label] for s in samples]] = 1.0
    return y


def class_weights(samples: list[Sample], classes: tuple[str, ...]) -> dict[int, float]:
    """Inverse-frequency weights, so a rare class weighs as much as a common one in the loss."""
    counts = np.array([sum(s.label == c for s in samples) for c in classes], np.float64)
    counts = np.maximum(counts, 1)
    weights = counts.sum() / (len(classes) * counts)
    return {i: float(w) for i, w in enumerate(weights)}


def make_sequence(samples, classes, geometry, batch_size, augment: AugmentParams | None, seed: int,
                  colour: ColourStandard = NO_STANDARD):
    """A keras PyDataset of (pixels, one-hot) batches; augmented anew every epoch when asked."""
    import keras

    class CropSequence(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0
            self.order = np.arange(len(samples))
            self.y = one_hot(samples, classes)

        def __len__(self):
            return math.ceil(len(samples) / batch_size)

        def __getitem__(self, index):
            idx = self.order[index * batch_size:(index + 1) * batch_size]
            rng = np.random.default_rng((seed, self.epoch, index)) if augment else None
            params = augment or NO_AUGMENT
            x = np.stack([sample_crop(samples[i], geometry, rng, params, colour) for i in idx])
            return model_input(x), self.y[idx]

        def on_epoch_end(self):
            self.epoch += 1
            if augment:
                self.order = np.random.default_rng((seed, self.epoch)).permutation(len(samples))

    return CropSequence()
