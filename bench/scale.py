"""Scale benchmark: how Cyclone's costs grow with its work, ratios and growth in one run.

Each section is a module with `add_arguments(parser)` and `run(args, figures)`, runnable
alone: `python -m bench.scale --only store`. Figures are printed as they come, then as JSON
lines (`figure`, `value`, `floor`, `ratio`) like the other benchmarks.

Sections:
- store (bench/store_scale.py): ingest sustained through LogPredictions, label join, window
  read, status and dashboard latency at growing table sizes, disk per million rows.
- pool (bench/pool_scale.py): 10/100/500 models in the serving pool behind Envoy, Zipf traffic:
  RSS, hot-model p99 against a one-model mesh, cold loads. Its own flags: run it alone for them.
- monitor (bench/monitor_scale.py): 10/100/1,000 models on one schedule: evaluation lag and
  CPU per evaluation against the bare window read. Its own flags: run it alone for them.
- production (bench/production_path.py): Envoy and the serving pool on every core against
  MLServer's worker configurations, c1 and c32. Its own flags: run it alone for them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from bench import monitor_scale, pool_scale, production_path, store_scale
from bench._common import ROOT, Figures


class _Alone:
    """A benchmark with flags of its own, run here as a section on its defaults."""

    def __init__(self, main: Callable[[], None]) -> None:
        self.main = main

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        return None

    def run(self, args: argparse.Namespace, figures: Figures) -> None:
        argv, sys.argv = sys.argv, sys.argv[:1]  # its own parser sees no flags of ours
        try:
            self.main()
        finally:
            sys.argv = argv


SECTIONS: dict[str, Any] = {
    "store": store_scale,
    "pool": _Alone(lambda: pool_scale.main([])),
    "monitor": _Alone(monitor_scale.main),
    "production": _Alone(lambda: production_path.main([])),
}


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
