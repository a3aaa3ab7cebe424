"""Scale benchmark: how Cyclone's costs grow with its work, ratios and growth in one run.

Each section is a module with `add_arguments(parser)` and `run(args, figures)`, runnable
alone: `python -m bench.scale --only store`. Figures are printed as they come, then as JSON
lines (`figure`, `value`, `floor`, `ratio`) like the other benchmarks.

Sections:
- store (bench/store_scale.py): ingest sustained through LogPredictions, label join, window
  read, status and dashboard latency at growing table sizes, disk per million rows.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from types import ModuleType

from bench import store_scale
from bench._common import ROOT, Figures

SECTIONS: dict[str, ModuleType] = {"store": store_scale}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable); default: all",
    )
    for section in SECTIONS.values():
        section.add_arguments(parser)
    args = parser.parse_args(argv)
    figures = Figures()
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        run: Callable[[argparse.Namespace, Figures], None] = SECTIONS[name].run
        run(args, figures)
    figures.emit()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
