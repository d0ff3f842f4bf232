"""Run the benchmarks: `python -m bench [--quick] [name ...]` (all of them by default)."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = [
    "trickle",
    "fast",
    "media",
    "webrtc",
    "startup",
    "e2e",
    "scenarios",
    "capacity",
    "catchup",
    "memory",
    "passthrough",
]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (a few minutes in all)")
    parser.add_argument("names", nargs="*", metavar="name", help="any of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    for name in args.names or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        path = module.main(quick=args.quick)
        print(path.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
