"""The ``statecore`` command (``python -m statecore``): ``bench``, ``inspect`` and ``demo``.

Each subcommand is a module with ``add_parser(subparsers)`` (which sets ``func``) and a
``main(args) -> int``; :data:`COMMANDS` lists them in help order.  A bad command line exits with
code 2 and one line on stderr; a failing run (a ``StateError`` such as a corrupt checkpoint, or an
``OSError``) exits with code 1 and one line on stderr, never a traceback.
"""
import argparse
import sys

PROG = "statecore"


def _bench():
    from statecore import _bench
    return _bench


def _inspect():
    from statecore import _inspect
    return _inspect


def _demo():
    from statecore import demo
    return demo


def _not_yet(name, what):
    """A subcommand that is announced but not implemented yet: a clear error, exit code 2."""
    def add_parser(subparsers):
        p = subparsers.add_parser(name, help=f"{what} (not available yet)", description=f"{what} (not available yet)")
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=lambda args: _fail(f"{name} is not available yet in this version of statecore"))
        return p
    return add_parser


COMMANDS = {
    "bench": lambda subparsers: _bench().add_parser(subparsers),
    "inspect": lambda subparsers: _inspect().add_parser(subparsers),
    "demo": lambda subparsers: _demo().add_parser(subparsers),
}


def _fail(message, code=2):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _one_line(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, Exception) and type(exc).__module__.startswith("statecore") \
        else f"{type(exc).__name__}: {text}"


def build_parser():
    from statecore import __version__
    parser = argparse.ArgumentParser(prog=PROG, description="statecore: Flink's keyed state backends for Python.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 a run failed, 2 a bad command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from statecore._bench import UsageError
    from statecore.errors import StateError
    try:
        return args.func(args)
    except UsageError as e:
        return _fail(f"{args.command}: {e}")
    except BrokenPipeError:
        # stdout closed early (e.g. `statecore inspect X --json | head`): stop quietly, like other tools.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (StateError, OSError) as e:
        return _fail(f"{args.command}: {_one_line(e)}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
