"""``python -m fastdf.bench`` (also ``fastdf-bench``): run benchmark suites and report
fastdf against every baseline measured in the same run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases and repetitions (the default "
                                                             "on a machine without a GPU)")
    parser.add_argument("--full", action="store_true", help="on the CPU: every CPU case with full repetitions "
                                                            "(tens of minutes on 2 cores); GPUs run the full set "
                                                            "unless --quick")
    parser.add_argument("--compile", action="store_true", help="instead of timing: compile every GPU kernel for "
                                                               "sm_90a without a GPU and report registers, spills, "
                                                               "shared memory, wgmma, load kind, occupancy "
                                                               "(python -m fastdf.bench.compile; --json applies)")
    parser.add_argument("--json", metavar="PATH", help="write environment and results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the results as a Markdown table")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of fastdf's speedups (matplotlib)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip measuring the GPU's copy/GEMM ceilings")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (each case's line is "
                                                                   "still printed as it finishes)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure each case N times and report the medians, with the range of each ratio "
                             "(default 1; CPU ratios near parity swing +-5-15%% run to run)")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="with --repeat N: each of the N runs in a new Python process, then combined as "
                             "--repeat combines them (a process's heap and cache state moves CPU ratios near "
                             "parity by several percent, the same way for all its repeats)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full contradict each other")
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give a number of runs >= 1")
    if args.fresh_processes and args.repeat < 2:
        parser.error("--fresh-processes needs --repeat N with N >= 2 (the runs it spreads over processes)")
    if args.compile and (args.suite or args.markdown or args.plot or args.quick or args.full or args.repeat != 1):
        parser.error("--compile takes only --json (see python -m fastdf.bench.compile --help for its options)")
    if not args.list:
        check_args(parser, args)
    return args, suites


def _check_output(parser, option: str, path: str):
    """Refuse an output path that cannot be written, before any benchmark runs: the path is
    not a directory (nor another non-file), and its folder, or the nearest existing ancestor
    when folders are missing (they are created when the results are written), accepts new
    files."""
    if not path:
        parser.error(f"{option}: the path is empty")
    target = Path(path)
    if target.is_dir():
        parser.error(f"{option} {path}: is a directory; give a file path")
    if target.exists() and not target.is_file():
        parser.error(f"{option} {path}: exists and is not a regular file")
    # Results are written to a temporary file in the folder and renamed over the path, so
    # the folder must accept new files. Probe by creating one: permission bits do not tell
    # (root, read-only mounts, /proc).
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        parser.error(f"{option} {path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".fastdf-bench-probe-"):
            pass
    except OSError as err:
        parser.error(f"{option} {path}: cannot create files in {parent} ({err.strerror})")


def check_args(parser, args):
    """Everything that would otherwise fail after the run (and lose its results): output
    paths, matplotlib for --plot, and --device."""
    for option in ("json", "markdown", "plot"):
        if getattr(args, option) is not None:
            _check_output(parser, f"--{option}", getattr(args, option))
    outputs = [os.path.abspath(p) for p in (args.json, args.markdown, args.plot) if p is not None]
    if len(set(outputs)) != len(outputs):
        parser.error("--json, --markdown and --plot must name different files")
    if args.plot is not None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as err:
            parser.error(f"--plot needs matplotlib ({err}); install it (pip install matplotlib) or drop --plot")
        suffix = Path(args.plot).suffix.lower().lstrip(".")
        formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
        if suffix and suffix not in formats:
            parser.error(f"--plot {args.plot}: matplotlib cannot write .{suffix} files (use one of "
                         f"{', '.join(sorted(formats))})")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError, TypeError):
            parser.error(f"--device {args.device!r}: not a device (use cuda, cuda:N or cpu)")
        if device.type not in ("cuda", "cpu"):
            parser.error(f"--device {args.device!r}: the benchmarks run on cuda or cpu")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                parser.error(f"--device {args.device}: torch sees no CUDA device")
            if device.index is not None and device.index >= torch.cuda.device_count():
                parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def _run_in_processes(args, device, rows, save):
    """--fresh-processes: ``args.repeat`` child runs of this CLI (``--repeat 1``, JSON into a
    temporary folder), one after another, each case's line echoed as the child prints it;
    then each case's runs combined as core.run combines in-process repeats, into ``rows``
    (``save(rows)`` after each child). A child that fails stops the run with its output."""
    import subprocess

    child = [sys.executable, "-m", "fastdf.bench", "--device", str(device), "--repeat", "1", "--no-progress"]
    for name in args.suite or ():
        child += ["--suite", name]
    child += [flag for flag, on in (("--quick", args.quick), ("--full", args.full),
                                    ("--no-ceilings", args.no_ceilings)) if on]
    runs: list[list[dict]] = []
    with tempfile.TemporaryDirectory(prefix="fastdf-bench-") as tmp:
        for n in range(args.repeat):
            path = os.path.join(tmp, f"run{n}.json")
            proc = subprocess.Popen(child + ["--json", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            output = []
            try:
                for line in proc.stdout:
                    output.append(line)
                    if line.startswith("["):  # the case lines; the child's header and table are this run's
                        print(f"[process {n + 1}/{args.repeat}] {line}", end="", flush=True)
                code = proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
                raise
            if code != 0:
                raise SystemExit(f"run {n + 1} of {args.repeat} ({' '.join(child)}) exited with {code}:\n"
                                 + "".join(output[-40:]))
            with open(path) as f:
                runs.append(json.load(f)["results"])
            rows[:] = _combine_processes(runs)
            if save is not None:
                save(rows)


def _combine_processes(runs: list[list[dict]]) -> list[dict]:
    """Rows of several whole runs (each a list of rows, case after case) as one: each case's
    rows from every run that has it, through core.combine_runs, in the first run's order."""
    cases: dict[tuple, list[list[dict]]] = {}  # in order of first appearance
    for run in runs:
        rows: dict[tuple, list[dict]] = {}
        for row in run:
            rows.setdefault((row["suite"], row["case"]), []).append(row)
        for key, case_rows in rows.items():
            cases.setdefault(key, []).append(case_rows)
    return [row for case_runs in cases.values() for row in core.combine_runs(case_runs)]


def main(argv=None):
    args, suites = parse_args(argv)
    if args.list:
        for name, s in sorted(suites.items()):
            print(f"{name:<12} {s.help}")
        return 0
    if args.compile:
        # A child process: the compile report needs the kernels imported without
        # TRITON_INTERPRET, which this process may have set before importing fastdf.
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "fastdf.bench.compile"] + (["--json", args.json] if args.json else [])
        return subprocess.run(cmd, env=env).returncode
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Without a GPU the full CPU set takes tens of minutes on a small machine: the quick set
    # (minutes) unless asked for.
    quick = args.quick or (device.type == "cpu" and not args.full)
    env = core.environment(device)
    env["repeat"] = args.repeat
    if device.type == "cuda" and not args.no_ceilings:
        env["ceilings"] = core.measure_ceilings(device)
    print(" | ".join(f"{k}: {env[k]}" for k in ("device", "torch", "triton", "cuda", "commit", "fastdf._C")))
    if env.get("ceilings"):
        print(f"ceilings: {env['ceilings']}")
    if device.type == "cpu":
        print(CPU_BANNER)
        if quick and not args.quick:
            print("CPU default: the quick case set (--full for every CPU case with full repetitions).")
    rows, interrupted, start = [], False, time.perf_counter()
    save = (lambda done: core.write_json(args.json, done, env)) if args.json else None
    env["fresh_processes"] = args.fresh_processes
    try:
        if args.fresh_processes:
            _run_in_processes(args, device, rows, save)
        else:
            core.run(args.suite or sorted(suites), device, quick, progress=not args.no_progress, rows=rows,
                     on_case=save, echo=lambda line: print(line, flush=True), repeat=args.repeat)
    except KeyboardInterrupt:  # e.g. a time limit in gpu_check.sh: keep what was measured
        interrupted = True
        print(f"interrupted: reporting the {len({(r['suite'], r['case']) for r in rows})} finished case(s)")
    print()
    print(core.table(rows))
    wrote = []
    if args.json:
        core.write_json(args.json, rows, env)
        wrote.append(f"JSON: {args.json}")
    if args.markdown:
        core.write_text(args.markdown, core.markdown(rows, env) + "\n")
        wrote.append(f"Markdown: {args.markdown}")
    if args.plot:
        core.plot(args.plot, rows, env)
        wrote.append(f"plot: {args.plot}")
    print(f"{len({(r['suite'], r['case']) for r in rows})} case(s) in {time.perf_counter() - start:.0f} s; "
          + ("wrote " + ", ".join(wrote) if wrote else "no files written (--json/--markdown/--plot PATH to keep them)"))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
