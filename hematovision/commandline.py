"""What every hematovision command shares: --version, -v/--quiet anywhere, defaults in --help, progress bars."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from . import __version__

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (unless it is none, off, or the help gives it already) and keeps
    the description's paragraphs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or \
                action.default == argparse.SUPPRESS or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def new_parser(prog: str, description: str, *, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A top-level parser with --version, -v/--verbose and -q/--quiet."""
    parser = parser_class(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_output_options(parser, top=True)
    return parser


def add_output_options(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/--verbose and -q/--quiet. On a sub-command's parser they default to nothing, so that the same
    options given before the sub-command are kept: `cmd -v sub` and `cmd sub -v` are the same."""
    default = False if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log more, every step, to stderr")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="log only warnings and errors, and show no progress bar")


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str, **options) -> argparse.ArgumentParser:
    """A sub-command's parser that shows defaults in --help and takes -v/--quiet after the sub-command too."""
    options.setdefault("description", help_text[:1].upper() + help_text[1:] + ".")
    parser = sub.add_parser(name, help=help_text, formatter_class=HelpFormatter, **options)
    add_output_options(parser)
    return parser


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options given in `argv`, as opposed to those left at their defaults. The
    parser's defaults are changed: pass one made for this."""
    for p in _parsers(parser):
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction):
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser] + [q for a in subs for child in a.choices.values() for q in _parsers(child)]


def log_level(args: argparse.Namespace, normal: int = logging.INFO, verbose: int = logging.DEBUG) -> int:
    """The level -v / --quiet ask for: `verbose`, WARNING, or `normal` without either."""
    if getattr(args, "verbose", False):
        return verbose
    return max(normal, logging.WARNING) if getattr(args, "quiet", False) else normal


def setup_logging(args: argparse.Namespace, normal: int = logging.INFO, verbose: int = logging.DEBUG,
                  fmt: str = LOG_FORMAT, stream=None) -> None:
    """Log to `stream` (default stderr, which journald collects under systemd) at the level the options
    ask for."""
    logging.basicConfig(level=log_level(args, normal, verbose), stream=stream or sys.stderr, format=fmt,
                        force=True)


def progress_wanted(args: argparse.Namespace, machine_output: bool = False) -> bool:
    """A progress bar only for a person: stdout and stderr are terminals, no --json, no --quiet."""
    if machine_output or getattr(args, "quiet", False):
        return False
    return _is_terminal(sys.stdout) and _is_terminal(sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _NoBar:
    """Stands in for a progress bar where none is shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, text: str) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, description: str, unit: str, enabled: bool = True, stream=None) -> Iterator:
    """A tqdm bar on `stream` (default stderr) that log lines print above, or a silent stand-in when not
    `enabled` (or tqdm is not installed). The bar is cleared when done."""
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        yield _NoBar()
        return
    with tqdm(total=total, desc=description, unit=unit, file=stream or sys.stderr, leave=False,
              dynamic_ncols=True) as bar, \
            logging_redirect_tqdm():
        yield bar
