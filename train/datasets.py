"""Training data: class-folder image sets and annotated BCCD fields, as labelled samples."""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hematovision.classes import DEFAULT_CLASSES, parse_label
from hematovision.errors import DataError, ImageUnreadable
from hematovision.pixels import IMAGE_SUFFIXES, read_rgb

logger = logging.getLogger(__name__)

# A red cell is about 7.5 um across: the ruler for fields with no known pixel size.
RED_CELL_DIAMETER_UM = 7.5

# BCCD fields that re-photograph the same cell, or overlap so far that their cells may be the
# same: each linked set is one group, so a cell never lands in both training and test. The first
# six pairs are listed in ../shared/data/README.md; the rest were found by SIFT matching of the
# fields against each other (`hematovision-train kaggle-origins` uses the same matcher).
BCCD_SAME_CELL = (
    ("00204", "00277"), ("00230", "00257"), ("00244", "00247"),
    ("00382", "00395"), ("00386", "00391"), ("00243", "00250"),
    ("00227", "00260"), ("00236", "00253"), ("00381", "00397"), ("00223", "00263"),
    ("00206", "00278"), ("00231", "00256"), ("00205", "00276"), ("00384", "00393"),
    ("00228", "00259"), ("00225", "00262"), ("00229", "00258"), ("00232", "00255"),
    ("00037", "00038"), ("00226", "00261"), ("00237", "00252"), ("00233", "00254"),
    ("00107", "00108"), ("00364", "00409"), ("00044", "00045"), ("00365", "00408"),
    ("00165", "00193"), ("00166", "00193"), ("00242", "00248", "00249"), ("00224", "00264"),
    # overlapping fields whose labelled white cells differ: grouped to be safe
    ("00204", "00276"), ("00039", "00283"), ("00019", "00020"), ("00223", "00264"),
)


def _same_cell_groups(links) -> dict[str, str]:
    """Field number -> group id (the smallest number in its linked set), linking transitively."""
    parent: dict[str, str] = {}

    def root(n: str) -> str:
        while parent.setdefault(n, n) != n:
            n = parent[n]
        return n

    for link in links:
        for other in link[1:]:
            a, b = sorted((root(link[0]), root(other)))
            parent[b] = a
    return {n: root(n) for n in parent}


_BCCD_GROUP_OF = _same_cell_groups(BCCD_SAME_CELL)

# Where each Kaggle "Blood Cell Images" augmentation came from (`hematovision-train
# kaggle-origins`): its `_<n>_<id>` name does not say, and TRAIN and TEST share some cells.
KAGGLE_ORIGINS = (Path(__file__).with_name("kaggle_train_origins.csv"),
                  Path(__file__).with_name("kaggle_test_origins.csv"))


@dataclass(frozen=True)
class Sample:
    """One labelled cell: a whole image, or a box in an annotated field."""

    path: str
    label: str
    group: str
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in pixels; None = whole image
    um_per_pixel: float | None = None  # set for field crops

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass(frozen=True)
class Skipped:
    """An input left out of a run, and why."""

    path: str
    reason: str


@dataclass
class Dataset:
    """Samples plus everything left out, so a run can list it."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def extend(self, other: "Dataset") -> None:
        self.samples += other.samples
        self.skipped += other.skipped
        self.sources += other.sources


def load_folders(root: str | Path, classes=DEFAULT_CLASSES, origins: dict | None = None) -> Dataset:
    """Images in one sub-folder per class (the Kaggle "Blood Cell Images" layout).

    An image whose BCCD field is known (`origins`: (split, label, file name) -> group; by default
    the committed Kaggle origins) joins that field's group, so augmentations of one cell, and
    the BCCD field itself, stay in one split; any other image is its own group.
    Unreadable images are skipped and listed. Raises DataError for a sub-folder that is
    not a known class, or a class folder with no images.
    """
    root = Path(root)
    origins = kaggle_origin_groups() if origins is None else origins
    data = Dataset(sources=[f"folders:{root.name}"])
    for sub, label in _class_folders(root, classes, data):
        data.extend(_load_class_folder(sub, label, root.name, origins))
    return data


def _class_folders(root: Path, classes, data: Dataset):
    """(folder, class) of each sub-folder of a known class in this run's list; the other known
    classes' folders are listed in `data.skipped`. Raises DataError for a missing root or a
    sub-folder that is not a known class."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder with one sub-folder of images per class")
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = parse_label(sub.name, where=str(sub))
        if label in classes:
            yield sub, label
        else:
            data.skipped.append(Skipped(str(sub), f"class {label} not in this run's classes"))


def _load_class_folder(folder: Path, label: str, split_name: str, origins: dict) -> Dataset:
    data = Dataset()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: class folder has no images; remove it or add images")
    for path in files:
        try:
            read_rgb(path)
        except ImageUnreadable as err:
            data.skipped.append(Skipped(str(path), str(err)))
            continue
        group = origins.get((split_name.upper(), label, path.name), f"file:{split_name}/{label}/{path.stem}")
        data.samples.append(Sample(str(path), label, group))
    unknown = sum(s.group.startswith("file:") for s in data.samples)
    if unknown:
        logger.warning("%s: %d of %d images have no known BCCD origin; each is its own group, so "
                       "augmentations of one cell may straddle splits", folder, unknown, len(data.samples))
    return data


def load_cell_images(root: str | Path, classes=DEFAULT_CLASSES, um_per_pixel: float | None = None) -> Dataset:
    """Single-cell images in one sub-folder per class (the PBC layout), cut as the device cuts them.

    Each image goes through the device's own path (`hematovision.edge.vision.locate`): segmented, its pixel
    size measured from its red cells (or `um_per_pixel`), and the white cell at its centre taken,
    so the crop has the bundle's geometry in micrometres. Each image is its own group (no donor
    ids). Images with no white cell at the centre, or unreadable, are skipped and listed.
    Raises DataError for a sub-folder that is not a known class.
    """
    root = Path(root)
    data = Dataset(sources=[f"cells:{root.name}"])
    for sub, label in _class_folders(root, classes, data):
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            data.extend(_cell_image_sample(path, label, f"{root.name.lower()}:{label}/{path.stem}", um_per_pixel))
    logger.info("%s: %d cells located, %d images skipped", root, len(data.samples), len(data.skipped))
    return data


def _cell_image_sample(path: Path, label: str, group: str, um_per_pixel: float | None) -> Dataset:
    from hematovision.edge.vision.locate import locate_cell

    try:
        cell = locate_cell(read_rgb(path), um_per_pixel, name=str(path))
    except (ImageUnreadable, DataError) as err:
        return Dataset(skipped=[Skipped(str(path), str(err))])
    return Dataset(samples=[Sample(str(path), label, group, box_centred_on(cell.detection), cell.um_per_pixel)])


def box_centred_on(detection) -> tuple[int, int, int, int]:
    """A box of the detection's size centred (to half a pixel) where the device centres its crop:
    the nucleus centroid, not the middle of the cell box."""
    w, h = detection.bbox[2] - detection.bbox[0], detection.bbox[3] - detection.bbox[1]
    x0, y0 = round(detection.center[0] - w / 2), round(detection.center[1] - h / 2)
    return (x0, y0, x0 + w, y0 + h)


# Licence and attribution of each known data source (by the lab prefix of its groups). They travel
# with whatever is trained on the data: the bundle's provenance repeats them.
LICENCES = {
    "bccd": "BCCD Dataset (github.com/Shenggan/BCCD_Dataset), MIT licence, Copyright (c) 2017 shenggan",
    "pbc": "PBC dataset, CC BY 4.0: A. Acevedo, A. Merino, S. Alferez, A. Molina, L. Boldu, J. Rodellar, "
           "\"A dataset of microscopic peripheral blood cell images for development of automatic recognition "
           "systems\", Data in Brief 30 (2020) 105474, doi:10.1016/j.dib.2020.105474",
    "file": "images from a class-folder set (--folders): licence as given by its source",
}


def licences_of(samples) -> dict[str, str]:
    """Licence and attribution of the data sources behind `samples`, by lab."""
    return {lab: LICENCES.get(lab, "unknown source: record its licence before shipping a model trained on it")
            for lab in sorted({lab_of(s) for s in samples})}


def lab_of(sample: Sample) -> str:
    """The laboratory (data source) of a sample: the prefix of its group ("bccd", "pbc", ...)."""
    return sample.group.split(":", 1)[0]


def kaggle_origin_groups(paths=KAGGLE_ORIGINS) -> dict[tuple[str, str, str], str]:
    """(split, label, file name) -> BCCD group, from confident rows of origins CSVs."""
    out = {}
    for path in paths:
        with Path(path).open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row["bccd_field"] and row["confident"] != "0":
                    out[(row["split"].upper(), row["label"], row["image"])] = bccd_group(row["bccd_field"])
    return out


def load_bccd(root: str | Path, classes=DEFAULT_CLASSES, um_per_pixel: float | None = None) -> Dataset:
    """White cells of annotated BCCD fields: `root/BCCD/{Annotations,JPEGImages}` + `root/labels.csv`.

    A field contributes its WBC boxes when its type list matches them one to one (one type for
    one box, or the same type for every box); other fields are skipped and listed. The pixel
    size, unless given, is estimated from the median annotated red-cell box (about 7.5 um).
    Raises DataError naming the file and line for an unknown label or a WBC box outside its image.
    """
    root = Path(root)
    ann_dir, img_dir = root / "BCCD" / "Annotations", root / "BCCD" / "JPEGImages"
    labels = read_bccd_labels(root / "labels.csv")
    fields = {p.stem: parse_voc(p) for p in sorted(ann_dir.glob("*.xml"))}
    if not fields:
        raise DataError(f"{ann_dir}: no VOC annotation files; expected BCCD/Annotations/*.xml under {root}")
    if um_per_pixel is None:
        um_per_pixel = pixel_size_from_red_boxes(fields.values())
        logger.info("BCCD pixel size estimated from annotated red cells: %.4f um/px", um_per_pixel)
    data = Dataset(sources=[f"bccd:{root.name}"])
    for stem, voc in fields.items():
        number = int(stem.split("_")[-1])
        types = labels.get(number)
        data.extend(_field_samples(img_dir / f"{stem}.jpg", voc, types, classes, um_per_pixel))
    return data


def _field_samples(path: Path, voc: "VocField", types, classes, um_per_pixel: float) -> Dataset:
    data = Dataset()
    boxes = voc.boxes("WBC")
    reason = _field_problem(boxes, types, classes)
    if reason is None and not path.is_file():
        reason = "image file missing"
    if reason is None:
        try:
            read_rgb(path)
        except ImageUnreadable as err:
            reason = str(err)
    if reason:
        data.skipped.append(Skipped(str(path), reason))
        return data
    group = bccd_group(path.stem)
    for box in boxes:
        data.samples.append(Sample(str(path), types[0], group, box, um_per_pixel))
    return data


def _field_problem(boxes, types, classes) -> str | None:
    if types is None or not types:
        return "no WBC type in labels.csv"
    if not boxes:
        return "no WBC box"
    if len(set(types)) > 1 or (len(boxes) > 1 and len(types) != len(boxes)):
        return f"{len(boxes)} WBC boxes for types {types}: cannot tell which box is which"
    if types[0] not in classes:
        return f"class {types[0]} not in this run's classes"
    return None


def bccd_group(stem: str) -> str:
    """Group id of a BCCD field: fields re-photographing the same cell share one."""
    number = stem.split("_")[-1]
    return f"bccd:{_BCCD_GROUP_OF.get(number, number)}"


def read_bccd_labels(path: Path) -> dict[int, list[str]]:
    """Field number -> list of WBC types, from BCCD's labels.csv (`,Image,Category`).

    Raises DataError naming the file and line for a missing column or an unknown label.
    """
    if not path.is_file():
        raise DataError(f"{path}: no labels file; BCCD needs labels.csv with the WBC type per field")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"Image", "Category"} <= set(reader.fieldnames or ()):
            raise DataError(f"{path}:1: expected columns Image and Category, got {reader.fieldnames}")
        return {int(row["Image"]): _parse_types(row["Category"], f"{path}:{reader.line_num}")
                for row in reader if row["Image"].strip()}


def _parse_types(text: str, where: str) -> list[str]:
    return [parse_label(t, where) for t in text.split(",") if t.strip()]


@dataclass(frozen=True)
class VocField:
    """A Pascal VOC annotation: image size and named boxes."""

    path: str
    width: int
    height: int
    objects: tuple[tuple[str, tuple[int, int, int, int], int], ...]  # name, box, xml line

    def boxes(self, name: str) -> list[tuple[int, int, int, int]]:
        """Valid boxes of one class; a bad WBC box is an error, a bad other box is dropped."""
        out = []
        for obj_name, box, line in self.objects:
            if obj_name != name:
                continue
            problem = _box_problem(box, self.width, self.height)
            if problem and name == "WBC":
                raise DataError(f"{self.path}:{line}: WBC box {box} {problem}; fix or delete the box")
            if not problem:
                out.append(box)
        return out


def _box_problem(box, width: int, height: int) -> str | None:
    x0, y0, x1, y1 = box
    if x1 - x0 < 2 or y1 - y0 < 2:
        return "is empty or inverted"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return f"lies outside the {width}x{height} image"
    return None


def parse_voc(path: Path) -> VocField:
    """Read a Pascal VOC xml file. Raises DataError naming the file when it is malformed."""
    try:
        root = ET.parse(path).getroot()
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        lines = _object_lines(path)
        objects = tuple(_voc_object(o, line) for o, line in zip(root.findall("object"), lines))
    except (ET.ParseError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a valid Pascal VOC annotation ({err})") from err
    return VocField(str(path), width, height, objects)


def _voc_object(obj: ET.Element, line: int):
    name = obj.findtext("name").strip()
    box = tuple(int(float(obj.findtext(f"bndbox/{k}"))) for k in ("xmin", "ymin", "xmax", "ymax"))
    return name, box, line


def _object_lines(path: Path) -> list[int]:
    """Line number of each <object> element, in document order, for error messages."""
    text = path.read_text(errors="replace").splitlines()
    return [n for n, line in enumerate(text, start=1) if "<object" in line] + [0] * 1000


def pixel_size_from_red_boxes(fields) -> float:
    """um per pixel from the median side of annotated red-cell boxes not cut by the frame edge.

    Raises DataError when there are too few red-cell boxes to estimate from.
    """
    sides = [((x1 - x0) + (y1 - y0)) / 2.0 for voc in fields for x0, y0, x1, y1 in voc.boxes("RBC")
             if x0 > 2 and y0 > 2 and x1 < voc.width - 2 and y1 < voc.height - 2]
    if len(sides) < 20:
        raise DataError(f"only {len(sides)} whole red-cell boxes: give the pixel size (--um-per-pixel)")
    return RED_CELL_DIAMETER_UM / float(np.median(sides))
