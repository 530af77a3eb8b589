"""Training: a tiny real run on the sample fields, resuming after a stop, and its evaluation."""

import csv
import json

import pytest

from conftest import train_tiny
from hematovision.errors import DataError, ModelInvalid
from hematovision.train import recipe
from hematovision.train.cli import main as train_main
from hematovision.train.datasets import load_bccd
from hematovision.train.recipe import RunPaths, TrainConfig, prepare_run
from hematovision.train.runs import evaluate_run


def test_run_folder_holds_config_manifest_and_model(tiny_run):
    for path in (tiny_run.config, tiny_run.manifest, tiny_run.data, tiny_run.history, tiny_run.model,
                 tiny_run.head_model, tiny_run.skipped):
        assert path.is_file(), path
    data = json.loads(tiny_run.data.read_text())
    assert len(data["manifest_sha256"]) == 64 and data["sources"] == ["bccd:bccd"]
    epochs = list(csv.DictReader(tiny_run.history.open()))
    assert len(epochs) == 6 and all(float(e["loss"]) > 0 for e in epochs)


def test_evaluate_writes_metrics_report_and_pictures(tiny_run):
    folder = evaluate_run(tiny_run.root, None, "test", None)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "roc_auc_ovr", "ece"}
    n_test = sum(r["split"] == "test" for r in csv.DictReader(tiny_run.manifest.open()))
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["n"] == n_test > 0
    assert set(metrics["per_class"]) == {"neutrophil", "lymphocyte", "monocyte", "eosinophil"}
    for name in ("report.md", "confusion.png", "curves.png"):
        assert (folder / name).stat().st_size > 100
    assert "| monocyte |" in (folder / "report.md").read_text()


def test_stopped_run_resumes_where_it_was(tmp_path, monkeypatch):
    real_end = recipe.ProgressLog.on_epoch_end

    def crash_in_phase_two(self, epoch, logs=None):
        real_end(self, epoch, logs)
        if self.phase == 2 and epoch == 1:
            raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(recipe.ProgressLog, "on_epoch_end", crash_in_phase_two)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path / "run", finetune_epochs=4)
    run = RunPaths(tmp_path / "run")
    head_mtime = run.head_model.stat().st_mtime_ns
    assert not run.model.exists()
    monkeypatch.setattr(recipe.ProgressLog, "on_epoch_end", real_end)
    recipe.train(run)
    assert run.model.is_file() and run.head_model.stat().st_mtime_ns == head_mtime
    epochs = [int(r["epoch"]) for r in csv.DictReader(run.history.open())]
    assert epochs == [0, 1, 2, 0, 1, 2, 3]  # phase 1 once; phase 2 went on from epoch 3


def test_one_class_dataset_is_refused(samples_bccd, tmp_path):
    data = load_bccd(samples_bccd, classes=("neutrophil",))
    config = TrainConfig(backbone="tiny_cnn", weights="none", input_size=64)
    with pytest.raises(DataError, match="no samples of class lymphocyte, monocyte, eosinophil"):
        prepare_run(RunPaths(tmp_path / "r"), config, data)


def test_imagenet_weights_offline_fail_at_once_naming_alternatives(monkeypatch, tmp_path):
    import keras

    def no_network(*args, **kwargs):
        raise OSError("URL fetch failure: network is unreachable")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", no_network)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    from hematovision.train.backbones import build_backbone

    with pytest.raises(ModelInvalid, match="efficientnet_lite0"):
        build_backbone("efficientnet_b0", 64, "imagenet")


def test_cli_fit_reports_a_missing_folder_clearly(tmp_path, capsys):
    code = train_main(["fit", "--bccd", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                       "--backbone", "tiny_cnn", "--weights", "none"])
    assert code == 1 and "labels.csv" in capsys.readouterr().err


def test_a_smaller_labs_cells_repeat_toward_the_larger_labs_count():
    from hematovision.train.datasets import Sample
    from hematovision.train.recipe import balance_labs

    cells = [Sample(f"b{i}.jpg", "neutrophil", f"bccd:{i}") for i in range(10)] + \
            [Sample(f"p{i}.jpg", "neutrophil", f"pbc:neutrophil/{i}") for i in range(80)]
    assert balance_labs(cells, 1) == cells
    balanced = balance_labs(cells, 4)
    assert sum(s.group.startswith("bccd:") for s in balanced) == 40  # 8x would match; at most 4x
    assert sum(s.group.startswith("pbc:") for s in balanced) == 80
    assert len(balance_labs(cells, 20)) == 160


def _prepared_run(samples_bccd, folder, **settings):
    """A run folder as `fit` leaves it before training (its config, manifest and data provenance)."""
    config = TrainConfig(**{"backbone": "tiny_cnn", "weights": "none", "input_size": 64, **settings})
    prepare_run(RunPaths(folder), config, load_bccd(samples_bccd))
    return folder


def test_resuming_with_other_settings_is_refused_naming_each_differing_option(samples_bccd, tmp_path, capsys):
    run = _prepared_run(samples_bccd, tmp_path / "run", weights="imagenet", backbone="efficientnet_b0")
    before = sorted(p.name for p in run.iterdir())
    code = train_main(["fit", "--bccd", str(samples_bccd), "--out", str(run), "--weights", "none",
                       "--backbone", "tiny_cnn", "--batch-size", "32"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--weights none (the run has imagenet)" in err and "--backbone tiny_cnn (the run has efficientnet_b0)" in err
    assert "--batch-size" not in err  # given, but the same as the run's
    assert "--restart" in err and "new --out" in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_resuming_with_other_data_or_test_fields_is_refused(samples_bccd, samples_pbc, tmp_path, capsys):
    run = _prepared_run(samples_bccd, tmp_path / "run")
    assert train_main(["fit", "--cells", str(samples_pbc), "--out", str(run),
                       "--test-fields", "train/kaggle_test_origins.csv"]) == 1
    err = capsys.readouterr().err
    assert "data cells:pbc (the run has bccd:bccd)" in err and "--test-fields kaggle_test_origins.csv" in err


def test_restart_moves_the_old_run_aside_and_trains_anew(samples_bccd, tmp_path):
    run = _prepared_run(samples_bccd, tmp_path / "run", weights="imagenet", backbone="efficientnet_b0")
    code = train_main(["fit", "--bccd", str(samples_bccd), "--out", str(run), "--restart", "--backbone", "tiny_cnn",
                       "--weights", "none", "--input-size", "64", "--batch-size", "8", "--head-epochs", "1",
                       "--finetune-epochs", "0", "--patience", "10", "-q"])
    assert code == 0
    assert TrainConfig.load(run / "config.json").backbone == "tiny_cnn" and (run / "model.keras").is_file()
    (aside,) = tmp_path.glob("run.replaced-*")
    assert TrainConfig.load(aside / "config.json").backbone == "efficientnet_b0"
