"""The ``covidxray`` command: argument parsing over ``covidxray.api``, one API call a command.

``parser`` builds the arguments, ``commands`` runs them (one ``api`` call each, then printing);
``main`` runs a command line and turns its failures into exit statuses.

Defaults live in ``covidxray.config``: an option not given is not passed on, so the API's (and
``TrainConfig``'s) own default applies, and ``--help`` shows it. Building the parser imports no
deep-learning library.

Exit status: 0 success, 1 the job failed (or, for predict and explain, some files could not be
read), 2 usage errors, 130 interrupted.
"""

from __future__ import annotations

import logging
import sys

from covidxray import api
from covidxray.cli.commands import UsageError, default_run, run_and_sources
from covidxray.cli.parser import build_parser, default_words, train_options

__all__ = ["UsageError", "build_parser", "default_run", "default_words", "main",
           "run_and_sources", "train_options"]

log = logging.getLogger("covidxray")


def main(argv=None) -> int:
    """Run one ``covidxray`` command line; its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s: %(name)s: %(message)s" if args.verbose
                        else "%(levelname)s: %(message)s", stream=sys.stderr)
    level = log.level  # restored at the end: main() may run inside a longer process
    if args.verbose or args.quiet:  # ours only: other libraries' debug logs stay hidden
        log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except UsageError as exc:
        parser.error(str(exc))
    except api.UserError as exc:  # what the user can fix: one line, the file and the reason
        print(f"covidxray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"covidxray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, ours or a library's: never passed off as the user's
        if args.verbose:
            raise
        print(f"covidxray {args.command}: internal error: {type(exc).__name__}: {exc}\n"
              f"This is a bug, not a problem with your input: run the same command with -v "
              f"for the traceback, and report it.", file=sys.stderr)
        return 1
    finally:
        log.setLevel(level)
