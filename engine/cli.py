"""Command-line plumbing shared by every entry point (generate, convert, server, oracle)."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line `<module>: error: <message>` on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog.removeprefix('python -m ')}: error: {message}\n")
        sys.exit(2)
