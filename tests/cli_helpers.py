"""Running the `samtok` command in-process from tests."""

from __future__ import annotations

import contextlib
import io
from typing import Sequence


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """``samtok ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    from samtok.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()
