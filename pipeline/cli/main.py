"""The ``studios`` command: the parser, the dispatch to a subcommand, and error printing.

Every subcommand has ``--help``. Errors are one line on stderr (``studios: error: ...``) and a
non-zero exit status; ``--debug`` shows the traceback instead.

A subcommand is a function that adds its subparser, registered with :func:`command`::

    from pipeline.cli.main import command

    @command("thing")
    def _thing_parser(sub):
        p = sub.add_parser("thing", help="...")
        p.set_defaults(handler=_thing)   # _thing(args) -> exit status

The built-in subcommand modules are listed in :data:`BUILTIN`; modules outside ``pipeline``
(``flows.cli``, which imports Prefect) register theirs through the package entry-point group
``studios.commands`` (see pyproject.toml). A plugin that fails to load costs one warning line,
not the built-in commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from pipeline.core.errors import StudiosError

logger = logging.getLogger("pipeline.cli.main")

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]
AddParser = Callable[[SubParsers], None]

#: The subcommand modules of pipeline/cli, in the order ``studios --help`` lists them.
BUILTIN = (
    "pipeline.cli.ingest",
    "pipeline.cli.model",
    "pipeline.cli.train",
    "pipeline.cli.suggest",
    "pipeline.cli.propose",
    "pipeline.cli.annotate",
    "pipeline.cli.segment",
    "pipeline.cli.qc",
    "pipeline.cli.analyse",
    "pipeline.cli.demo",
)
#: The entry-point group other packages register subcommand modules in.
ENTRY_POINT_GROUP = "studios.commands"

_COMMANDS: dict[str, AddParser] = {}


def command(name: str) -> Callable[[AddParser], AddParser]:
    """Register a function that adds the subparser for ``name``."""

    def wrap(fn: AddParser) -> AddParser:
        _COMMANDS[name] = fn
        return fn

    return wrap


def _load_commands() -> None:
    """Import the built-in subcommand modules, then the plugins of :data:`ENTRY_POINT_GROUP`."""
    for name in BUILTIN:
        importlib.import_module(name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not take the built-in commands with it
            logger.warning("studios: skipping the commands of plugin %r (%s): %s: %s",
                           ep.name, ep.value, type(exc).__name__, " ".join(str(exc).split()))


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(
        prog="studios",
        description="Exact blockwise segmentation of large tomograms with stride-free local models.",
    )
    parser.add_argument("--version", action="version", version=f"studios {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _load_commands()
    for name, add in _COMMANDS.items():
        if add.__module__ in BUILTIN:
            add(sub)
            continue
        try:
            add(sub)
        except Exception as exc:
            sub.choices.pop(name, None)  # type: ignore[union-attr]
            sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != name]
            logger.warning("studios: skipping command %r of %s: %s: %s", name, add.__module__,
                           type(exc).__name__, " ".join(str(exc).split()))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # distributed configures its own log handlers when first imported: quiet them unless --debug
    if "--debug" not in (argv if argv is not None else sys.argv[1:]):
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        for noisy in ("distributed", "prefect", "httpx", "dask_jobqueue"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline.core import interrupt

    try:
        with interrupt.handling():  # SIGTERM / SIGINT: finish running work, record it, exit 143 / 130
            return int(args.handler(args))
    except interrupt.Interrupted as exc:
        print(f"studios: {exc}", file=sys.stderr)
        return exc.exit_code
    except StudiosError as exc:
        if args.debug:
            raise
        print(f"studios: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("studios: interrupted", file=sys.stderr)
        return interrupt.exit_code(130)
    except Exception as exc:
        if args.debug:
            raise
        print(f"studios: internal error: {type(exc).__name__}: {exc}; rerun with --debug for the traceback",
              file=sys.stderr)
        return 70
