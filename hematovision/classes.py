"""The white-cell class vocabulary shared by training, export and the device, and each class's role."""

from __future__ import annotations

from .errors import DataError

# Every class the project knows, in canonical order: the five mature white cells, immature
# granulocytes (promyelocytes, myelocytes, metamyelocytes), nucleated red cells, and platelets
# (not a white cell: a reject class for false detections).
KNOWN_CLASSES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil",
                                  "ig", "erythroblast", "platelet")
# The four classes of the first laboratory (BCCD): the default for training, and what an old
# four-class bundle names.
DEFAULT_CLASSES: tuple[str, ...] = KNOWN_CLASSES[:4]
# Reported for a cell the model is not sure of; never a training class.
UNIDENTIFIED = "unidentified"

# A class's role in a report. The differential (the 100%) is made of white cells; nucleated red
# cells are counted beside it as "NRBC per 100 WBC" (the usual haematology convention); a
# reject class is a detection that is not a white cell: listed apart, left out of every result.
DIFFERENTIAL = "differential"
PER_100_WBC = "per_100_wbc"
REJECT = "reject"
ROLES: dict[str, str] = {**{c: DIFFERENTIAL for c in KNOWN_CLASSES[:6]},
                         "erythroblast": PER_100_WBC, "platelet": REJECT}

# Names readers and other datasets use for the same classes.
_ALIASES = {
    "immature granulocyte": "ig", "immature_granulocyte": "ig", "immature granulocytes": "ig",
    "nrbc": "erythroblast", "nucleated red cell": "erythroblast", "nucleated red blood cell": "erythroblast",
    "thrombocyte": "platelet",
}


def parse_label(text: str, where: str) -> str:
    """Return the canonical lower-case class name for a label such as 'NEUTROPHIL' or 'IG'.

    Raises DataError naming `where` (a file and line) when the label is not a known class.
    """
    name = text.strip().lower()
    name = _ALIASES.get(name, name)
    if name.endswith("s") and name[:-1] in KNOWN_CLASSES:
        name = name[:-1]
    if name not in KNOWN_CLASSES:
        raise DataError(
            f"{where}: label {text.strip()!r} is not a known cell class; "
            f"use one of {', '.join(KNOWN_CLASSES)}"
        )
    return name


def role(name: str) -> str:
    """The report role of a canonical class name: DIFFERENTIAL, PER_100_WBC or REJECT."""
    return ROLES[name]


def differential_classes(classes) -> tuple[str, ...]:
    """The classes of a model that make up the 100% differential, in the model's order."""
    return tuple(c for c in classes if ROLES.get(c) == DIFFERENTIAL)


def validate_class_list(classes: tuple[str, ...] | list[str], where: str) -> tuple[str, ...]:
    """Check a model's class list: known names, no repeats, at least two white-cell classes.

    Raises DataError naming `where` otherwise.
    """
    out = tuple(parse_label(c, where) for c in classes)
    if len(set(out)) != len(out):
        raise DataError(f"{where}: class list {list(classes)} repeats a class")
    if len(differential_classes(out)) < 2:
        raise DataError(f"{where}: a classifier needs at least two white-cell classes, got {list(classes)}")
    return out
