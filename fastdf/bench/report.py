"""``python -m fastdf.bench.report [RESULTS_DIR] [-o BENCHMARKS.md]``: rebuild BENCHMARKS.md
from ``benches/results/*.json``, showing the latest run per card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .core import markdown

HEADER = """# fastdf benchmarks

Latest results per card, written by `python -m fastdf.bench.report` from
`benches/results/*.json` (produced by `benches/gpu_check.sh` on a lent GPU; see
benches/README.md). "vs fastdf" is the baseline's median time over fastdf's in the same
run: above 1, fastdf is faster. CPU runs show algorithmic wins only, never kernel speed.
"""


def latest_per_device(paths):
    runs = {}
    for path in sorted(paths):
        data = json.loads(Path(path).read_text())
        env = data["environment"]
        key = env["device"]
        if key not in runs or env["date"] > runs[key][0]["environment"]["date"]:
            runs[key] = (data, path)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdf.bench.report", description=__doc__)
    parser.add_argument("results", nargs="?", default="benches/results")
    parser.add_argument("-o", "--output", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    runs = latest_per_device(Path(args.results).glob("*.json"))
    parts = [HEADER]
    if not any(not device.startswith("CPU") for device in runs):
        parts.append("No GPU results yet: the next session with a lent GPU runs `benches/gpu_check.sh` first.\n")
    for device, (data, path) in sorted(runs.items()):
        parts.append(f"## {device}\n\nFrom `{Path(path).as_posix()}`.\n\n{markdown(data['results'], data['environment'])}\n")
    Path(args.output).write_text("\n".join(parts))
    print(f"wrote {args.output} ({len(runs)} card(s))")


if __name__ == "__main__":
    main()
