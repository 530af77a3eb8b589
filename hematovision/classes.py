"""The white-cell class vocabulary shared by training, export and the device."""

from __future__ import annotations

from .errors import DataError

# Every class the project knows, in canonical order. Basophil is ready for when data exists.
KNOWN_CLASSES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
# The classes there is data for today: the default for training.
DEFAULT_CLASSES: tuple[str, ...] = KNOWN_CLASSES[:4]
# Reported for a cell the model is not sure of; never a training class.
UNIDENTIFIED = "unidentified"


def parse_label(text: str, where: str) -> str:
    """Return the canonical lower-case class name for a label such as 'NEUTROPHIL'.

    Raises DataError naming `where` (a file and line) when the label is not a known class.
    """
    name = text.strip().lower()
    if name.endswith("s") and name[:-1] in KNOWN_CLASSES:
        name = name[:-1]
    if name not in KNOWN_CLASSES:
        raise DataError(
            f"{where}: label {text.strip()!r} is not a white-cell class; "
            f"use one of {', '.join(KNOWN_CLASSES)}"
        )
    return name


def validate_class_list(classes: tuple[str, ...] | list[str], where: str) -> tuple[str, ...]:
    """Check a model's class list: known names, no repeats, at least two.

    Raises DataError naming `where` otherwise.
    """
    out = tuple(parse_label(c, where) for c in classes)
    if len(set(out)) != len(out):
        raise DataError(f"{where}: class list {list(classes)} repeats a class")
    if len(out) < 2:
        raise DataError(f"{where}: a classifier needs at least two classes, got {list(classes)}")
    return out
