"""``python -m fastdf.bench`` (also ``fastdf-bench``): run benchmark suites and report
fastdf against every baseline measured in the same run."""

from __future__ import annotations

import argparse
import sys

import torch

from . import core

CPU_BANNER = (
    "NOTE: no CUDA device: these are CPU wall-clock times of the torch backends at small sizes.\n"
    "They show algorithmic wins only (one prefill instead of k, cached vs recomputed context,\n"
    "skipped weight gradients), never kernel speed."
)


def parse_args(argv=None):
    suites = core.load_suites()
    listing = "\n".join(f"  {name:<12} {s.help}" for name, s in sorted(suites.items()))
    parser = argparse.ArgumentParser(
        prog="python -m fastdf.bench",
        description="Time fastdf ops and workflows against their baselines.",
        epilog=f"suites:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", action="append", choices=sorted(suites), metavar="NAME",
                        help="suite to run (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases and repetitions")
    parser.add_argument("--json", metavar="PATH", help="write environment and results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the results as a Markdown table")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of fastdf's speedups (matplotlib)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip measuring the GPU's copy/GEMM ceilings")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    return parser.parse_args(argv), suites


def main(argv=None):
    args, suites = parse_args(argv)
    if args.list:
        for name, s in sorted(suites.items()):
            print(f"{name:<12} {s.help}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    env = core.environment(device)
    if device.type == "cuda" and not args.no_ceilings:
        env["ceilings"] = core.measure_ceilings(device)
    print(" | ".join(f"{k}: {env[k]}" for k in ("device", "torch", "triton", "cuda", "commit", "fastdf._C")))
    if env.get("ceilings"):
        print(f"ceilings: {env['ceilings']}")
    if device.type == "cpu":
        print(CPU_BANNER)
    rows, interrupted = [], False
    save = (lambda done: core.write_json(args.json, done, env)) if args.json else None
    try:
        core.run(args.suite or sorted(suites), device, args.quick, progress=not args.no_progress, rows=rows,
                 on_case=save)
    except KeyboardInterrupt:  # e.g. a time limit in gpu_check.sh: keep what was measured
        interrupted = True
        print(f"interrupted: reporting the {len({(r['suite'], r['case']) for r in rows})} finished case(s)")
    print(core.table(rows))
    if args.json:
        core.write_json(args.json, rows, env)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(core.markdown(rows, env) + "\n")
    if args.plot:
        core.plot(args.plot, rows, env)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
