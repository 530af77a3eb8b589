"""Export: int8 conversion of a real small model, the gate, and the device loader's refusals."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from hematovision.edge.vision.bundle_meta import stamped
from hematovision.edge.vision.model_bundle import load_bundle
from hematovision.errors import ModelInvalid
from hematovision.export import bundle as export_bundle
from hematovision.export.bundle import ExportOptions, export_run
from hematovision.export.cli import main as export_main
from hematovision.export.confidence import fit_confidence, rejection_threshold
from hematovision.export.gate import GateMargins, judge
from hematovision.train.batches import crops_array
from hematovision.train.evaluate import compute_metrics, predict_logits
from hematovision.train.runs import load_run_model
from hematovision.train.recipe import TrainConfig
from hematovision.train.splits import read_manifest

# The sample run's test split has ten cells, so one flipped cell is ten points: these margins
# let a sound int8 model through and still stop a broken one.
# The tiny model is near chance, so the absolute floor is opened too.
LOOSE = GateMargins(accuracy_pt=15.0, recall_pt=55.0, min_agreement=0.75, min_macro_f1=0.0, min_recall=0.0)


@pytest.fixture(scope="module")
def bundle_dir(lite0_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "lite0"
    export_run(lite0_run.root, out, ExportOptions(margins=LOOSE))
    return out


def _all_cells(run):
    config = TrainConfig.load(run.config)
    return config, [r.sample for r in read_manifest(run.manifest)]


def test_bundle_holds_a_full_integer_model_and_its_description(bundle_dir):
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    model = (bundle_dir / "model.tflite").read_bytes()
    assert meta["model_sha256"] == hashlib.sha256(model).hexdigest()
    assert meta["quantization"]["non_int8_ops"] == []
    assert meta["input"] == {"size": 96, "dtype": "uint8", "color_order": "RGB"}
    assert meta["quantization"]["input"]["scale"] > 0 and meta["quantization"]["calibration_crops"] >= 200
    assert meta["classes"] == ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    assert meta["crop_geometry"]["side_um"] == 24.0 and 0.06 < meta["crop_geometry"]["trained_um_per_pixel"] < 0.085
    assert meta["confidence"]["temperature"] > 0 and 0 < meta["confidence"]["threshold"] < 1
    assert set(meta["metrics"]) == {"split", "float", "int8", "by_lab"} and meta["gate"]["passed"]
    assert set(meta["metrics"]["by_lab"]) == {"bccd"} and meta["colour"]["method"] == "none"
    assert "MIT" in meta["provenance"]["data_licences"]["bccd"]
    assert len(meta["provenance"]["manifest_sha256"]) == 64
    assert 50 < meta["stain_stats"]["lab_mean"][0] < 100 and meta["stain_stats"]["images"] >= 10
    bccd = meta["stain_range"]["bccd"]
    assert bccd["images"] >= 10 and 50 < bccd["mean"][0] < 100 and 0 < bccd["sd"][0] < 10


def test_device_loader_gives_the_float_models_top1_on_real_crops(bundle_dir, lite0_run):
    config, cells = _all_cells(lite0_run)
    float_logits = predict_logits(load_run_model(lite0_run), cells, config.geometry)
    int8_logits = load_bundle(bundle_dir, threads=2).model.logits(crops_array(cells, config.geometry))
    assert np.corrcoef(float_logits.ravel(), int8_logits.ravel())[0, 1] > 0.95
    top2 = np.sort(float_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.5  # quantization may only flip near-ties
    assert clear.sum() >= 5
    np.testing.assert_array_equal(float_logits[clear].argmax(1), int8_logits[clear].argmax(1))
    assert (float_logits.argmax(1) == int8_logits.argmax(1)).mean() >= 0.75


def test_gate_refuses_int8_that_disagrees_with_float_even_at_equal_scores():
    classes = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
    y = np.tile(np.arange(4), 5)
    float_pred, int8_pred = (y + 1) % 4, (y + 2) % 4  # both always wrong: no accuracy or recall drop

    no_floor = GateMargins(min_macro_f1=0.0, min_recall=0.0)

    def judged(pred_int8, margins=no_floor):
        metrics = [compute_metrics(np.eye(4)[p], y, classes) for p in (float_pred, pred_int8)]
        return judge(*metrics, float_pred, pred_int8, y, margins)

    refused = judged(int8_pred)
    assert not refused.passed and refused.agreement == 0.0 and "top-1 class on 0.0%" in refused.reasons[0]
    assert judged(float_pred).passed and judged(float_pred).agreement == 1.0
    assert judged(int8_pred, GateMargins(min_agreement=0.0, min_macro_f1=0.0, min_recall=0.0)).passed


def test_gate_refuses_a_poor_model_whose_int8_copy_agrees_with_it():
    classes = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
    y = np.tile(np.arange(4), 10)
    pred = np.where(y == 3, 0, y)  # eosinophils never found; the rest right: macro-F1 0.67
    metrics = compute_metrics(np.eye(4)[pred], y, classes)
    refused = judge(metrics, metrics, pred, pred, y, GateMargins())
    assert not refused.passed and refused.agreement == 1.0
    assert any("macro-F1 0.667 is below the floor 0.80" in r for r in refused.reasons)
    assert any("eosinophil 0.00" in r for r in refused.reasons)
    assert judge(metrics, metrics, pred, pred, y, GateMargins(min_macro_f1=0.6, min_recall=0.0)).passed


def test_gate_refuses_pixels_calibrated_at_one_255th(lite0_run, tmp_path, monkeypatch, capsys):
    real = export_bundle.calibration_crops
    monkeypatch.setattr(export_bundle, "calibration_crops", lambda *a: real(*a).astype(np.float32) / 255.0)
    out = tmp_path / "bundle"
    code = export_main([str(lite0_run.root), "--out", str(out), "--max-accuracy-drop", str(LOOSE.accuracy_pt),
                        "--max-recall-drop", str(LOOSE.recall_pt), "--min-agreement", str(LOOSE.min_agreement),
                        "--min-macro-f1", "0", "--min-recall", "0"])
    assert code == 1 and not out.exists() and not list(tmp_path.iterdir())
    err = capsys.readouterr().err
    assert "refused, no bundle written" in err and "float's top-1 class on" in err


def _broken_copy(bundle_dir, tmp_path, edit):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    edit(copy)
    return copy


def _edit_meta(key, value, restamp=True):
    """An edit of bundle.json, stamped again (as `--restamp` would) so that the field checks are reached."""
    def edit(folder):
        meta = json.loads((folder / "bundle.json").read_text())
        meta[key] = value
        (folder / "bundle.json").write_text(json.dumps(stamped(meta) if restamp else meta))
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f / "model.tflite").write_bytes((f / "model.tflite").read_bytes()[:5000]), "sha256"),
    (lambda f: (f / "bundle.json").unlink(), "bundle.json: missing"),
    (lambda f: (f / "bundle.json").write_text("{not json"), "not valid JSON"),
    (_edit_meta("format", "hematovision.bundle/99"), "format"),
    (_edit_meta("classes", ["neutrophil", "lymphocyte", "monocyte"]), r"not in the order the model was measured"),
    (_edit_meta("name", "edited", restamp=False), r"meta_sha256 does not match its content.*--restamp"),
])
def test_broken_bundle_refuses_to_load_naming_the_problem(bundle_dir, tmp_path, edit, message):
    with pytest.raises(ModelInvalid, match=message):
        load_bundle(_broken_copy(bundle_dir, tmp_path, edit))


def test_truncated_model_with_matching_hash_is_still_refused(bundle_dir, tmp_path):
    def truncate(folder):
        data = (folder / "model.tflite").read_bytes()[:4000]
        (folder / "model.tflite").write_bytes(data)
        _edit_meta("model_sha256", hashlib.sha256(data).hexdigest())(folder)
    with pytest.raises(ModelInvalid, match="model.tflite: not a loadable TFLite model"):
        load_bundle(_broken_copy(bundle_dir, tmp_path, truncate))


def test_threshold_rejects_at_most_two_percent_of_correct_cells():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    logits = rng.normal(0, 1, (500, 4))
    logits[np.arange(500), y] += rng.uniform(0, 5, 500)
    conf = fit_confidence(logits, y, 0.02)
    assert 0 < conf.rejected_correct <= 0.02 and conf.rejected_wrong > conf.rejected_correct
    assert conf.ece_after <= conf.ece_before + 1e-9
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    assert rejection_threshold(probs, np.array([0, 0, 1]), 0.0) == pytest.approx(0.6)


def test_bundle_loads_and_classifies_where_tensorflow_cannot_be_imported(bundle_dir, samples_bccd):
    import subprocess
    import sys

    code = f"""
import sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):
            raise ImportError('TensorFlow is not installed on this device')
sys.meta_path.insert(0, NoTensorFlow())
from hematovision.edge.vision.model_bundle import load_bundle
from hematovision.edge.vision.pipeline import FieldPipeline
from hematovision.pixels import read_rgb
result = FieldPipeline(load_bundle({str(bundle_dir)!r})).process(read_rgb({str(samples_bccd / 'BCCD/JPEGImages/BloodImage_00000.jpg')!r}))
print(len(result.cells), result.cells[0].prediction.label)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, label = done.stdout.split()
    assert int(count) >= 1 and label in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "unidentified")


def test_bundle_carries_a_novelty_model_fitted_on_held_out_cells(bundle_dir):
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    novelty = meta["novelty"]
    assert novelty["method"] == "mahalanobis" and novelty["file"] == "novelty.npz" and novelty["threshold"] > 0
    assert novelty["sha256"] == hashlib.sha256((bundle_dir / "novelty.npz").read_bytes()).hexdigest()
    assert meta["quantization"]["features"]["dtype"] == "int8"
    val = meta["abstention"]["val"]
    assert val["novel"] <= 0.2 and set(meta["abstention"]["test_by_lab"]) == {"bccd"}
    bundle = load_bundle(bundle_dir)
    assert bundle.model.n_features == novelty["features"] == bundle.novelty.features  # the pooled features
    assert bundle.novelty.centres.shape == (4, novelty["dims"])  # one lab, four classes


def test_a_crop_unlike_any_training_cell_is_unidentified_whatever_its_softmax_says(bundle_dir, lite0_run):
    from hematovision.edge.vision.classify import classify_crops

    bundle = load_bundle(bundle_dir, threads=2)
    config, cells = _all_cells(lite0_run)
    real = crops_array(cells[:8], config.geometry)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)  # nothing a microscope shows
    familiar, strange = classify_crops(bundle, real), classify_crops(bundle, noise)
    assert np.median([p.novelty for p in strange]) > 2 * np.median([p.novelty for p in familiar])
    assert all(p.unfamiliar and p.label == "unidentified" for p in strange)
    assert sum(p.unfamiliar for p in familiar) <= 2


# TensorFlow's own log lines, as its C++ and Python code print them during an export.
TENSORFLOW_NOISE = ("absl::InitializeLog", "oneDNN", "I0000", "W0000", "fully_quantize", "XNNPACK",
                    "Assets written to", "cpu_feature_guard")


def _on_a_terminal(command: list[str], columns: int = 120) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal of `columns` as its stdin, stdout and stderr; (exit code, output)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=600), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_export_on_a_terminal_shows_its_stages_and_hides_tensorflows_log(tiny_run, tmp_path):
    import sys

    out = tmp_path / "bundle"
    code, text = _on_a_terminal([sys.executable, "-m", "hematovision.export.cli", str(tiny_run.root), "--out",
                                 str(out), "--calibration-crops", "200", "--min-macro-f1", "0", "--min-recall", "0",
                                 "--max-accuracy-drop", "100", "--max-recall-drop", "100", "--min-agreement", "0"])
    assert code == 0, text[-3000:]
    assert (out / "bundle.json").is_file()
    assert "converting to int8" in text and "/6 [" in text  # the bar, at its stages
    assert "gate PASSED" in text  # the program's own log stays
    noise = [line for line in text.splitlines() if any(words in line for words in TENSORFLOW_NOISE)]
    assert not noise, noise
