"""Benchmarks: python -m benchmarks (CPU, the contract's JSON), benchmarks.gpu, benchmarks.kernels_bench."""

import subprocess
from pathlib import Path


def git_sha() -> str:
    """HEAD's SHA, with "-dirty" when tracked files differ from it (the numbers are then not that commit's)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
