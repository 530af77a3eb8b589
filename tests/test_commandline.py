"""What the four commands share: --version, -v/--quiet anywhere, defaults in --help, progress bars, usage."""

from __future__ import annotations

import io
import logging

import pytest

import hematovision
from hematovision.calibration.cli import build_parser as calibrate_parser
from hematovision.calibration.cli import main as calibrate_main
from hematovision.edge.cli import build_parser as edge_parser
from hematovision.edge.cli import main as edge_main
from hematovision.export.cli import build_parser as export_parser
from hematovision.train.cli import build_parser as train_parser

PARSERS = {"hematovision-edge": edge_parser, "hematovision-train": train_parser,
           "hematovision-export": export_parser, "hematovision-calibrate": calibrate_parser}
FIELDS = "BCCD/JPEGImages"


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as a person's shell is."""

    def isatty(self) -> bool:
        return True


def _help(parser, *command: str) -> str:
    for action in parser._actions:
        if command and hasattr(action, "choices") and isinstance(action.choices, dict):
            return action.choices[command[0]].format_help()
    return parser.format_help()


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_command_prints_its_version(prog, capsys):
    with pytest.raises(SystemExit) as done:
        PARSERS[prog]().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {hematovision.__version__}"


@pytest.mark.parametrize("prog, argv", [
    ("hematovision-edge", ["count", "x.jpg"]), ("hematovision-train", ["evaluate", "run"]),
    ("hematovision-calibrate", ["show", "p.json"])])
def test_verbose_and_quiet_are_taken_before_and_after_the_subcommand(prog, argv):
    parser = PARSERS[prog]
    for verbose in (["-v", *argv], [*argv, "-v"], [*argv, "--verbose"]):
        assert parser().parse_args(verbose).verbose is True
    for quiet in (["--quiet", *argv], [*argv, "--quiet"], [*argv, "-q"]):
        args = parser().parse_args(quiet)
        assert args.quiet is True and args.verbose is False
    plain = parser().parse_args(argv)
    assert plain.verbose is False and plain.quiet is False


def test_export_takes_verbose_and_quiet():
    assert export_parser().parse_args(["run", "--out", "b", "-v"]).verbose is True
    assert export_parser().parse_args(["--quiet", "run", "--out", "b"]).quiet is True


@pytest.mark.parametrize("prog, command, shown", [
    ("hematovision-edge", "count", ["(default: 100)", "(default: specimen)"]),
    ("hematovision-train", "fit", ["(default: 32)", "(default: 224)", "(default: efficientnet_b0)",
                                   "(default: 0.001)"]),
    ("hematovision-export", None, ["(default: 1.0)", "(default: 300)", "(default: 0.95)"]),
    ("hematovision-calibrate", "blank", ["(default: 5)", "(default: 1.0)"]),
])
def test_help_shows_the_defaults(prog, command, shown):
    text = " ".join(_help(PARSERS[prog](), *([command] if command else [])).split())
    for words in shown:
        assert words in text, words
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_explains_the_threads_and_batch_size_options():
    count = " ".join(_help(edge_parser(), "count").split())
    assert "--threads THREADS classifier threads; default: one per core" in count
    assert "--batch-size BATCH_SIZE crops per training step (default: 32)" in " ".join(
        _help(train_parser(), "fit").split())


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_descriptions_speak_to_the_user_not_of_the_code(prog):
    parser = PARSERS[prog]()
    texts = [parser.format_help()] + [_help(parser, name) for name in _commands(parser)]
    for text in texts:
        assert "argument parsing" not in text


def _commands(parser) -> list[str]:
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return list(action.choices)
    return []


# --- calibrate blank ----------------------------------------------------------------------

def _blank_images(tmp_path) -> list[str]:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        image = np.clip(rng.normal(200, 3, (120, 160, 3)), 0, 255).astype(np.uint8)
        paths.append(str(tmp_path / f"blank{i}.png"))
        cv2.imwrite(paths[-1], image)
    return paths


def test_calibrate_blank_takes_profile_like_the_other_calibrate_commands(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    assert calibrate_main(["blank", *_blank_images(tmp_path), "--profile", str(profile)]) == 0
    assert profile.is_file() and "deprecated" not in capsys.readouterr().err


def test_calibrate_blank_out_still_works_with_a_deprecation_warning(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    assert calibrate_main(["blank", *_blank_images(tmp_path), "--out", str(profile)]) == 0
    assert profile.is_file()
    assert "--out is deprecated" in capsys.readouterr().err


def test_calibrate_blank_without_a_profile_is_a_usage_error(tmp_path, capsys):
    assert calibrate_main(["blank", *_blank_images(tmp_path)]) == 2
    assert "give --profile PROFILE" in capsys.readouterr().err


# --- progress ----------------------------------------------------------------------------

def _count_with(monkeypatch, stdout, stderr, argv) -> tuple[str, str]:
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    assert edge_main(argv) == 0
    logging.getLogger().handlers.clear()
    return stdout.getvalue(), stderr.getvalue()


def test_count_shows_a_progress_bar_on_a_terminal(tiny_bundle, samples_bccd, monkeypatch):
    _, err = _count_with(monkeypatch, Terminal(), Terminal(),
                         ["count", "--all", "--model", str(tiny_bundle), str(samples_bccd / FIELDS)])
    assert "counting:" in err and "/34" in err and "field" in err


@pytest.mark.parametrize("stdout, extra", [(io.StringIO, []), (Terminal, ["--json"]), (Terminal, ["--quiet"])])
def test_count_shows_no_progress_bar_when_piped_under_json_or_quiet(tiny_bundle, samples_bccd, monkeypatch,
                                                                   stdout, extra):
    out, err = _count_with(monkeypatch, stdout(), Terminal(),
                           ["count", "--all", "--model", str(tiny_bundle), *extra, str(samples_bccd / FIELDS)])
    assert "counting:" not in err and "/34" not in err and "counting:" not in out
