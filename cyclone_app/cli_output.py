"""The console the CLI prints tables with."""

from __future__ import annotations

import os
import sys
from typing import Any

# Wide enough for any table row; a pipe or a file has no width of its own.
UNBOUNDED = 1000


def console() -> Any:
    """Rich's console; when output is not a terminal (a pipe, a file, `| grep`), tables take the
    width they need instead of being cut at rich's 80-column default (COLUMNS still wins)."""
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=UNBOUNDED)
