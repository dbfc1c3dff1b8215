"""Running the command line in tests: in process through click (``cli``), or as the installed
console script in a child process (``console_script``: what a user's shell runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from repfuse.cli import main

REPFUSE = Path(sys.executable).with_name("repfuse")


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def console_script(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPFUSE), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


SCREENSHOT = Path(__file__).parents[1] / "scripts" / "screenshot-report"


def screenshot(page: Path, png: Path, *options: object) -> subprocess.CompletedProcess:
    """``scripts/screenshot-report PAGE PNG [options]``: exit 0 when the page fits the printed
    width, 1 when something sticks out, 2 without Chromium."""
    return subprocess.run([sys.executable, str(SCREENSHOT), str(page), str(png),
                           *map(str, options)], capture_output=True, text=True, timeout=600)
