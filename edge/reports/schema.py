"""The report's JSON Schema and a small validator for the subset of JSON Schema it uses."""

from __future__ import annotations

import functools
import json
import math
import re
from importlib import resources

from hematovision.errors import DataError

SCHEMA_ID = "hematovision.report/1"
SCHEMA_FILE = "report_schema.json"

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v)),
}


# The keywords first_problem checks, and annotations that carry no rule. A schema using any other
# keyword (or additionalProperties as a schema) would let through values nothing checks.
CHECKED_KEYWORDS = frozenset({
    "type", "const", "enum", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "required", "properties", "additionalProperties", "minItems", "maxItems", "items"})
ANNOTATIONS = frozenset({"$schema", "$id", "title", "description"})


class ReportInvalid(DataError):
    """A report dict does not follow hematovision.report/1."""


@functools.cache
def report_schema() -> dict:
    """The report JSON Schema shipped beside this module."""
    text = resources.files(__package__).joinpath(SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


def unchecked_keywords(schema: dict, path: str = "$") -> list[str]:
    """Where `schema` uses a keyword this validator would silently ignore (none for the shipped one)."""
    out = [f"{path}.{key}" for key in schema if key not in CHECKED_KEYWORDS | ANNOTATIONS]
    if schema.get("additionalProperties", False) is not False:
        out.append(f"{path}.additionalProperties (only false is checked)")
    for key, sub in schema.get("properties", {}).items():
        out += unchecked_keywords(sub, f"{path}.{key}")
    if "items" in schema:
        out += unchecked_keywords(schema["items"], f"{path}[]")
    return out


def validate_report_dict(data: object) -> None:
    """Check `data` against the report schema.

    Raises ReportInvalid naming the first offending path and what is wrong.
    """
    problem = first_problem(data, report_schema(), "$")
    if problem is not None:
        raise ReportInvalid(f"report does not follow {SCHEMA_ID}: {problem}")


def first_problem(value: object, schema: dict, path: str) -> str | None:
    """The first schema violation of `value` as 'path: what', or None when it conforms."""
    for check in (_check_type, _check_const_enum, _check_string, _check_number,
                  _check_object, _check_array):
        problem = check(value, schema, path)
        if problem is not None:
            return problem
    return None


def _check_type(value, schema, path):
    wanted = schema.get("type")
    if wanted is None:
        return None
    names = [wanted] if isinstance(wanted, str) else wanted
    if any(_JSON_TYPES[name](value) for name in names):
        return None
    return f"{path}: expected {' or '.join(names)}, got {type(value).__name__}"


def _check_const_enum(value, schema, path):
    if "const" in schema and value != schema["const"]:
        return f"{path}: must be {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: must be one of {schema['enum']}"
    return None


def _check_string(value, schema, path):
    if not isinstance(value, str):
        return None
    if len(value) < schema.get("minLength", 0):
        return f"{path}: shorter than {schema['minLength']} characters"
    if len(value) > schema.get("maxLength", math.inf):
        return f"{path}: longer than {schema['maxLength']} characters"
    pattern = schema.get("pattern")
    if pattern is not None and not _pattern_matches(pattern, value):
        return f"{path}: does not match {pattern}"
    return None


def _pattern_matches(pattern: str, value: str) -> bool:
    # ECMA-262 '$' never matches before a final newline; Python's does, so check the end.
    match = re.search(pattern, value)
    return match is not None and (not pattern.endswith("$") or match.end() == len(value))


def _check_number(value, schema, path):
    if not _JSON_TYPES["number"](value):
        return None
    if value < schema.get("minimum", -math.inf):
        return f"{path}: below the minimum {schema['minimum']}"
    if value > schema.get("maximum", math.inf):
        return f"{path}: above the maximum {schema['maximum']}"
    return None


def _check_object(value, schema, path):
    if not isinstance(value, dict):
        return None
    properties = schema.get("properties", {})
    missing = [key for key in schema.get("required", []) if key not in value]
    if missing:
        return f"{path}: missing {', '.join(missing)}"
    if schema.get("additionalProperties") is False:
        extra = sorted(str(key) for key in value if key not in properties)
        if extra:
            return f"{path}: unknown key(s) {', '.join(extra)}"
    for key, sub in properties.items():
        if key in value:
            problem = first_problem(value[key], sub, f"{path}.{key}")
            if problem is not None:
                return problem
    return None


def _check_array(value, schema, path):
    if not isinstance(value, list):
        return None
    if len(value) < schema.get("minItems", 0):
        return f"{path}: fewer than {schema['minItems']} items"
    if len(value) > schema.get("maxItems", math.inf):
        return f"{path}: more than {schema['maxItems']} items"
    items = schema.get("items")
    for index, item in enumerate(value if items is not None else ()):
        problem = first_problem(item, items, f"{path}[{index}]")
        if problem is not None:
            return problem
    return None
