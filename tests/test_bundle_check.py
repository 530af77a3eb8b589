"""The whole bundle is verified: bundle.json is stamped at export, every field is checked, and
check-config refuses (78, one line) every malformed bundle instead of a traceback or a silent lie."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hematovision.edge.vision.bundle_meta import STAMP_KEY, meta_digest, stamped
from hematovision.edge.service.daemon import EX_CONFIG
from hematovision.edge.vision.model_bundle import load_bundle
from hematovision.errors import ModelInvalid
from hematovision.export.cli import main as export_main

REPO = Path(__file__).resolve().parents[1]
EDGE = [sys.executable, "-c", "import sys; from hematovision.edge.cli import main; sys.exit(main(sys.argv[1:]))"]


def edited(bundle: Path, folder: Path, change, restamp: bool) -> Path:
    """A copy of `bundle` whose bundle.json went through `change(meta)`, stamped again or not."""
    shutil.copytree(bundle, folder)
    meta = json.loads((folder / "bundle.json").read_text())
    change(meta)
    (folder / "bundle.json").write_text(json.dumps(stamped(meta) if restamp else meta, indent=2))
    return folder


def setter(dotted: str, value):
    def change(meta):
        *parents, last = dotted.split(".")
        node = meta
        for part in parents:
            node = node[part]
        node[last] = value
    return change


def deleter(dotted: str):
    def change(meta):
        *parents, last = dotted.split(".")
        node = meta
        for part in parents:
            node = node[part]
        del node[last]
    return change


def reorder_classes(meta):
    meta["classes"] = [meta["classes"][1], meta["classes"][0], *meta["classes"][2:]]


def check_config(daemon_config, bundle: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    config = daemon_config(model={"bundle": str(bundle)})
    return subprocess.run([*EDGE, "check-config", "--config", str(config)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


# Each malformed bundle the audit found, stamped again as a careless `--restamp` would: the field
# checks themselves must refuse it, naming the field.
MALFORMED = [
    ("classes reordered", reorder_classes, r"not in the order the model was measured in"),
    ("temperature missing", deleter("confidence.temperature"), r"confidence\.temperature is missing"),
    ("input empty", setter("input", {}), r"input\.size is missing"),
    ("quantization empty", setter("quantization", {}), r"quantization\.input\.dtype is missing"),
    ("crop_geometry not a table", setter("crop_geometry", "x"), r"crop_geometry must be a JSON object"),
    ("threshold not a number", setter("confidence.threshold", "abc"), r"confidence\.threshold = 'abc' must be a number"),
    ("temperature zero", setter("confidence.temperature", 0), r"confidence\.temperature = 0 must be a number above 0"),
    ("threshold negative", setter("confidence.threshold", -1), r"confidence\.threshold = -1 must be a number from 0 to 1"),
    ("colour malformed", setter("colour", {"method": "reinhard", "target_mean": [1, 2], "target_std": [1, 1, 1]}), r"colour.*three finite"),
    ("model hash malformed", setter("model_sha256", "abc"), r"model_sha256 = 'abc' must be 64 lower-case hex"),
    ("quantization disagrees", setter("quantization.output.zero_point", 3), r"quantization\.output .* disagrees"),
]


@pytest.mark.parametrize("name, change, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bundle_is_refused_naming_the_field_and_check_config_exits_78(
        tiny_bundle, tmp_path, daemon_config, name, change, message):
    bundle = edited(tiny_bundle, tmp_path / "bundle", change, restamp=True)
    with pytest.raises(ModelInvalid, match=message):
        load_bundle(bundle)
    result = check_config(daemon_config, bundle, tmp_path)
    assert result.returncode == EX_CONFIG, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "re-export" in errors[0] and "Traceback" not in result.stderr


def test_a_hand_edit_without_a_new_stamp_is_refused_saying_how_to_fix_it(tiny_bundle, tmp_path, daemon_config):
    bundle = edited(tiny_bundle, tmp_path / "bundle", reorder_classes, restamp=False)
    with pytest.raises(ModelInvalid, match=r"meta_sha256 does not match its content.*relabel every cell"):
        load_bundle(bundle)
    result = check_config(daemon_config, bundle, tmp_path)
    assert result.returncode == EX_CONFIG and "hematovision-export --restamp BUNDLE" in result.stderr
    del_stamp = edited(tiny_bundle, tmp_path / "unstamped", lambda m: m.pop(STAMP_KEY), restamp=False)
    with pytest.raises(ModelInvalid, match=r"has no meta_sha256"):
        load_bundle(del_stamp)


def test_export_stamps_bundle_json_and_restamp_accepts_only_a_sound_edit(tiny_bundle, tmp_path, capsys):
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    assert meta[STAMP_KEY] == meta_digest(meta) and list(meta)[-1] == STAMP_KEY
    renamed = edited(tiny_bundle, tmp_path / "renamed", setter("name", "hematovision-renamed"), restamp=False)
    assert export_main(["--restamp", str(renamed)]) == 0
    assert load_bundle(renamed).meta["name"] == "hematovision-renamed"
    broken = edited(tiny_bundle, tmp_path / "broken", setter("confidence.temperature", 0), restamp=False)
    before = (broken / "bundle.json").read_bytes()
    assert export_main(["--restamp", str(broken)]) == 1
    assert "confidence.temperature = 0" in capsys.readouterr().err
    assert (broken / "bundle.json").read_bytes() == before  # nothing written


def test_the_committed_reference_bundle_carries_a_valid_stamp():
    bundle = load_bundle(REPO / "models" / "reference", threads=1)
    assert bundle.meta[STAMP_KEY] == meta_digest(bundle.meta) and bundle.temperature > 0


def test_a_model_without_metrics_still_checks_its_classes_against_the_model(tiny_bundle, tmp_path):
    def three_classes(meta):
        meta.pop("metrics")
        meta["classes"] = meta["classes"][:3]
    bundle = edited(tiny_bundle, tmp_path / "bundle", three_classes, restamp=True)
    with pytest.raises(ModelInvalid, match="lists 3 classes but model.tflite has 4 outputs"):
        load_bundle(bundle)


# --- any value in any field: ModelInvalid or a bundle that loads, never another exception ----------

FIELDS = ["format", "classes", "input", "input.size", "input.dtype", "crop_geometry", "crop_geometry.side_um",
          "crop_geometry.input_size", "crop_geometry.trained_um_per_pixel", "quantization", "quantization.input",
          "quantization.input.scale", "quantization.input.zero_point", "quantization.output.dtype", "confidence",
          "confidence.temperature", "confidence.threshold", "colour", "model_sha256", "preprocessing", "name",
          "metrics", "metrics.float", "novelty", "novelty.threshold", "novelty.dims", "novelty.features", "novelty.sha256", "novelty.file",
          "quantization.features"]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


@pytest.fixture(scope="module")
def fuzz_folder(tiny_bundle, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(tiny_bundle, folder)
    return folder


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=JSON, drop=st.booleans())
def test_fuzz_any_field_set_to_any_json_value_is_refused_cleanly_or_loads(tiny_bundle, fuzz_folder, field, value,
                                                                          drop):
    meta = copy.deepcopy(json.loads((tiny_bundle / "bundle.json").read_text()))
    try:
        (deleter(field) if drop else setter(field, value))(meta)
    except (KeyError, TypeError):
        return  # a parent was replaced by an earlier part of the path; nothing to test
    (fuzz_folder / "bundle.json").write_text(json.dumps(stamped(meta)))
    try:
        bundle = load_bundle(fuzz_folder, threads=1)
    except ModelInvalid:
        return
    assert 0 < bundle.temperature and 0 <= bundle.threshold <= 1 and len(bundle.classes) >= 2
