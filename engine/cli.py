"""Command-line plumbing shared by every entry point (generate, convert, server, oracle)."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line `<module>: error: <message>` on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog.removeprefix('python -m ')}: error: {message}\n")
        sys.exit(2)


def one_line_errors(main, prog: str, errors=(FileNotFoundError, NotADirectoryError, ValueError)):
    """Wrap a `main(argv) -> int`: missing inputs and bad values (the user's mistakes, not bugs) become one line
    `<prog>: error: ...` on stderr and exit status 2, with no traceback."""

    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except errors as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            sys.stderr.write(f"{prog}: error: {msg}\n")
            return 2

    wrapped.__doc__ = main.__doc__
    return wrapped
