"""Which BCCD field each Kaggle "Blood Cell Images" augmentation was made from, by local features."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hematovision.classes import parse_label
from hematovision.errors import DataError
from hematovision.pixels import IMAGE_SUFFIXES, read_rgb

from .datasets import bccd_group

logger = logging.getLogger(__name__)

ORIGIN_FIELDS = ("split", "label", "image", "bccd_field", "bccd_group", "inliers",
                 "runner_up_field", "runner_up", "mirrored", "confident")


@dataclass(frozen=True)
class MatchSettings:
    """SIFT, ratio test, RANSAC and the confidence rule; image distances are at the Kaggle scale."""

    contrast_threshold: float = 0.015  # the soft fields give ~80 SIFT points at OpenCV's 0.04
    max_features: int = 1000
    ratio: float = 0.8  # Lowe's ratio test
    ransac_px: float = 3.0  # reprojection tolerance of a similarity transform
    candidates: int = 5  # fields verified per orientation, the top of a descriptor vote
    min_inliers: int = 20
    min_margin: float = 2.0  # best inliers >= min_margin x the best field of another group
    field_scale: float = 0.5  # BCCD 640x480 -> Kaggle 320x240

    def is_confident(self, inliers: int, runner_up: int) -> bool:
        return inliers >= self.min_inliers and inliers >= self.min_margin * runner_up


@dataclass(frozen=True)
class FieldFeatures:
    """SIFT keypoint positions and descriptors of one BCCD field at the Kaggle scale."""

    name: str
    points: np.ndarray  # N x 2 float32
    descriptors: np.ndarray  # N x 128 float32

    @property
    def group(self) -> str:
        return bccd_group(self.name)


@dataclass(frozen=True)
class FieldMatch:
    """The best field for one image, and the best field of any other group (the rival)."""

    field: str
    inliers: int
    mirrored: bool
    runner_up_field: str
    runner_up: int
    confident: bool

    @property
    def group(self) -> str:
        return bccd_group(self.field) if self.field else ""


def _sift(settings: MatchSettings):
    return cv2.SIFT_create(nfeatures=settings.max_features, contrastThreshold=settings.contrast_threshold)


def gray_of(path: str | Path, scale: float = 1.0) -> np.ndarray:
    """An image file as grayscale uint8, resized by `scale`. Raises ImageUnreadable."""
    gray = cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2GRAY)
    if scale != 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return gray


def features(gray: np.ndarray, settings: MatchSettings, name: str = "") -> FieldFeatures:
    """SIFT features of a grayscale image (no features gives empty arrays)."""
    keypoints, descriptors = _sift(settings).detectAndCompute(gray, None)
    if descriptors is None:
        return FieldFeatures(name, np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    return FieldFeatures(name, np.float32([k.pt for k in keypoints]), descriptors)


class FieldIndex:
    """Descriptors of every candidate field in one FLANN index, for voting on candidates."""

    def __init__(self, fields: list[FieldFeatures]):
        fields = [f for f in fields if len(f.descriptors) >= 2]
        if not fields:
            raise DataError("no BCCD field has local features to match against; check the field images")
        self.fields = fields
        self.owner = np.concatenate([np.full(len(f.descriptors), i) for i, f in enumerate(fields)])
        self.flann = cv2.FlannBasedMatcher(dict(algorithm=1, trees=4), dict(checks=64))
        self.flann.add([np.vstack([f.descriptors for f in fields])])
        self.flann.train()
        self.brute = cv2.BFMatcher(cv2.NORM_L2)

    def vote(self, query: FieldFeatures, settings: MatchSettings) -> list[int]:
        """Indices of the fields most query descriptors pass the ratio test on, best first."""
        if len(query.descriptors) < 2:
            return []
        pairs = self.flann.knnMatch(query.descriptors, k=2)
        hits = [self.owner[p[0].trainIdx] for p in pairs
                if len(p) == 2 and p[0].distance < settings.ratio * p[1].distance]
        votes = np.bincount(np.asarray(hits, dtype=int), minlength=len(self.fields))
        return [int(i) for i in np.argsort(-votes, kind="stable")[:settings.candidates] if votes[i] > 0]

    def inliers(self, query: FieldFeatures, i: int, settings: MatchSettings) -> int:
        """RANSAC inliers of a similarity transform from the query to field `i`."""
        field = self.fields[i]
        pairs = self.brute.knnMatch(query.descriptors, field.descriptors, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < settings.ratio * p[1].distance]
        if len(good) < 3:
            return 0
        src = query.points[[m.queryIdx for m in good]]
        dst = field.points[[m.trainIdx for m in good]]
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                              ransacReprojThreshold=settings.ransac_px)
        return int(mask.sum()) if mask is not None else 0


def index_fields(paths: list[Path], settings: MatchSettings = MatchSettings()) -> FieldIndex:
    """Features of BCCD field images, downscaled to the Kaggle scale. Raises ImageUnreadable."""
    return FieldIndex([features(gray_of(p, settings.field_scale), settings, Path(p).stem) for p in paths])


def index_bccd(root: str | Path, settings: MatchSettings = MatchSettings()) -> FieldIndex:
    """The index of every field in `root/BCCD/JPEGImages`. Raises DataError when there is none."""
    paths = sorted((Path(root) / "BCCD" / "JPEGImages").glob("*.jpg"))
    if not paths:
        raise DataError(f"{root}: no BCCD/JPEGImages/*.jpg; give the BCCD folder (--bccd)")
    return index_fields(paths, settings)


def match_image(gray: np.ndarray, index: FieldIndex, settings: MatchSettings = MatchSettings()) -> FieldMatch:
    """The field a grayscale image was made from: tried as it is and mirrored (SIFT is not
    mirror-invariant); the score is the inlier count; the rival is the best field of another
    BCCD group (re-photographed partner fields share a group and are not rivals).
    """
    scores: dict[int, tuple[int, bool]] = {}
    for mirrored in (False, True):
        query = features(cv2.flip(gray, 1) if mirrored else gray, settings)
        for i in index.vote(query, settings):
            score = index.inliers(query, i, settings)
            if score > scores.get(i, (-1, False))[0]:
                scores[i] = (score, mirrored)
    return _decide(scores, index, settings)


def _decide(scores: dict[int, tuple[int, bool]], index: FieldIndex, settings: MatchSettings) -> FieldMatch:
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1][0], kv[0]))
    if not ranked or ranked[0][1][0] == 0:
        return FieldMatch("", 0, False, "", 0, False)
    best, (inliers, mirrored) = ranked[0]
    group = index.fields[best].group
    rivals = [(i, s) for i, (s, _) in ranked if index.fields[i].group != group]
    rival, rival_score = rivals[0] if rivals else (None, 0)
    return FieldMatch(index.fields[best].name, inliers, mirrored,
                      index.fields[rival].name if rival is not None else "", rival_score,
                      settings.is_confident(inliers, rival_score))


@dataclass(frozen=True)
class ImageOrigin:
    """One Kaggle image and the BCCD field it was matched to."""

    split: str
    label: str
    image: str
    match: FieldMatch

    def cells(self) -> list:
        m = self.match
        return [self.split, self.label, self.image, m.field, m.group, m.inliers,
                m.runner_up_field, m.runner_up, int(m.mirrored), int(m.confident)]


def kaggle_images(kaggle_root: str | Path, split: str, every: int = 1) -> list[tuple[str, Path]]:
    """(label, path) of every `every`-th image of each class folder of one split.

    Raises DataError when the split folder is missing or holds no class folder.
    """
    folder = Path(kaggle_root) / split
    if not folder.is_dir():
        raise DataError(f"{folder}: no such split folder; give the Kaggle images folder holding {split}/")
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = parse_label(sub.name, where=str(sub))
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        out += [(label, p) for p in files[::every]]
    if not out:
        raise DataError(f"{folder}: no class folders with images")
    return out


def match_split(kaggle_root: str | Path, split: str, index: FieldIndex,
                settings: MatchSettings = MatchSettings(), every: int = 1) -> list[ImageOrigin]:
    """Match every `every`-th image of a Kaggle split to its BCCD field. Raises DataError."""
    images = kaggle_images(kaggle_root, split, every)
    out = []
    for n, (label, path) in enumerate(images, start=1):
        out.append(ImageOrigin(split, label, path.name, match_image(gray_of(path), index, settings)))
        if n % 250 == 0:
            logger.info("%s: %d of %d images matched", split, n, len(images))
    return out


def write_origins(origins: list[ImageOrigin], path: Path) -> None:
    """Write the origins CSV (ORIGIN_FIELDS), through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ORIGIN_FIELDS)
        writer.writerows(o.cells() for o in origins)
    tmp.replace(path)


def read_test_fields(path: str | Path) -> set[str]:
    """BCCD field names of an origins CSV (rows marked confident, when the column exists).

    Raises DataError when the file is missing or has no bccd_field column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; make it with hematovision-train kaggle-origins")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if "bccd_field" not in (reader.fieldnames or ()):
            raise DataError(f"{path}:1: no bccd_field column (columns: {reader.fieldnames})")
        return {r["bccd_field"].strip() for r in reader
                if r["bccd_field"].strip() and r.get("confident", "1").strip() != "0"}


def held_out_groups(path: str | Path) -> set[str]:
    """BCCD groups of the fields in an origins CSV: partner fields of the same cell follow.

    Raises DataError when the file is missing, has no bccd_field column or names no field.
    """
    fields = read_test_fields(path)
    if not fields:
        raise DataError(f"{path}: no confident bccd_field rows; nothing to hold out")
    groups = {bccd_group(f) for f in fields}
    logger.info("%s: %d BCCD fields, %d groups held out as the test split", Path(path).name, len(fields), len(groups))
    return groups


def label_disagreements(origins: list[ImageOrigin], labels: dict[int, list[str]]) -> list[ImageOrigin]:
    """Confident matches whose field's WBC types in BCCD's labels.csv lack the Kaggle class."""
    return [o for o in origins if o.match.confident
            and o.label not in labels.get(int(o.match.field.split("_")[-1]), [])]


def field_summary(origins: list[ImageOrigin]) -> dict[tuple[str, str], Counter]:
    """(split, label) -> how many confident images each BCCD field gave."""
    out: dict[tuple[str, str], Counter] = {}
    for o in origins:
        if o.match.confident:
            out.setdefault((o.split, o.label), Counter())[o.match.field] += 1
    return out
