"""The benchmark CLI runs on the CPU, reports ratios and survives a broken baseline."""

import json
import subprocess
import sys

import pytest
import torch

from fastdf.bench import core


def test_help_lists_suites():
    out = subprocess.run([sys.executable, "-m", "fastdf.bench", "--help"], capture_output=True, text=True, check=True)
    assert "--quick" in out.stdout and "cascade" in out.stdout


def test_quick_run_writes_json_plot_markdown(tmp_path):
    cmd = [sys.executable, "-m", "fastdf.bench", "--quick", "--suite", "cascade", "--no-progress",
           "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"), "--markdown", str(tmp_path / "b.md")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    if not torch.cuda.is_available():
        assert "algorithmic wins only" in out.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "torch", "triton", "commit", "date"} <= set(data["environment"])
    providers = {r["provider"] for r in data["results"]}
    assert {"fastdf", "torch-eager"} <= providers
    assert any("fastdf_speedup" in r for r in data["results"])
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "| cascade |" in (tmp_path / "b.md").read_text()
    # Each case's line is printed as it is measured (before the table), and the run ends by
    # saying where its files went.
    lines = out.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("[1/"))
    assert "cascade | G" in lines[first] and "torch-eager" in lines[first]
    assert first < next(i for i, line in enumerate(lines) if line.startswith("suite "))
    assert f"JSON: {tmp_path / 'b.json'}" in lines[-1] and f"plot: {tmp_path / 'b.png'}" in lines[-1]


def test_cpu_default_is_the_quick_set(monkeypatch, capsys):
    """Without a GPU, a plain run takes the quick case set unless --full is given."""
    from fastdf.bench import cli

    seen = []
    monkeypatch.setattr(core, "run", lambda names, device, quick, **kw: seen.append(quick) or [])
    monkeypatch.setattr(core, "environment", lambda device: dict.fromkeys(
        ("device", "torch", "triton", "cuda", "commit", "fastdf._C"), "x"))
    for argv, quick in ([], True), (["--full"], False), (["--quick"], True):
        assert cli.main(["--device", "cpu", "--suite", "cascade", *argv]) == 0
        assert seen.pop() is quick
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--full"])
    assert "contradict" in capsys.readouterr().err


def test_broken_baseline_is_reported_not_fatal():
    def setup(device):
        def broken():
            raise RuntimeError("baseline exploded")

        return {"fastdf": lambda: torch.ones(4).sum(), "broken": broken, "other": lambda: torch.ones(4).sum()}

    rows = core.run_case("toy", core.Case("tiny", setup, bytes=16), torch.device("cpu"), quick=True)
    by = {r["provider"]: r for r in rows}
    assert "baseline exploded" in by["broken"]["error"]
    assert by["other"]["fastdf_speedup"] > 0 and by["fastdf"]["GBps"] > 0
    assert "baseline exploded" in core.table(rows)


def test_unknown_suite_is_refused():
    out = subprocess.run([sys.executable, "-m", "fastdf.bench", "--suite", "nope"], capture_output=True, text=True)
    assert out.returncode != 0 and "nope" in out.stderr


# ---------------------------------------------------------------------------- issue 9: check before running

def _refused(monkeypatch, capsys, argv):
    """main(argv) must exit with an argparse error (status 2) without running a single case."""
    from fastdf.bench import cli

    def never(*args, **kwargs):
        raise AssertionError("a benchmark ran before the arguments were checked")

    monkeypatch.setattr(core, "run", never)
    monkeypatch.setattr(core, "environment", never)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_output_paths_are_refused_before_running(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for option, path, message in [
        ("--json", tmp_path, "is a directory"),
        ("--markdown", blocker / "sub" / "b.md", "is not a directory"),
        ("--json", "", "empty"),
        ("--plot", tmp_path / "b.xyz", "cannot write .xyz"),
        ("--json", "/proc/fastdf-bench.json", "cannot create files"),
    ]:
        err = _refused(monkeypatch, capsys, ["--quick", "--suite", "cascade", option, str(path)])
        assert option in err and message in err, err
    err = _refused(monkeypatch, capsys, ["--json", str(tmp_path / "a"), "--markdown", str(tmp_path / "a")])
    assert "different files" in err


def test_missing_matplotlib_is_refused_before_running(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.backends", "matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
    err = _refused(monkeypatch, capsys, ["--plot", str(tmp_path / "b.png")])
    assert "--plot needs matplotlib" in err


def test_bad_device_is_refused_before_running(monkeypatch, capsys):
    cases = [("nope", "not a device"), ("meta", "cuda or cpu")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "no CUDA device"))
    else:
        cases.append((f"cuda:{torch.cuda.device_count()}", "CUDA device(s) visible"))
    for device, message in cases:
        err = _refused(monkeypatch, capsys, ["--device", device])
        assert "--device" in err and message in err, err


def test_missing_folders_are_created_and_writes_are_atomic(tmp_path):
    path = tmp_path / "new" / "dir" / "b.json"
    core.write_json(path, [{"suite": "s"}], {"device": "cpu"})
    assert json.loads(path.read_text())["results"] == [{"suite": "s"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]  # no temporary left behind


def test_compile_flag_runs_the_compile_report_without_the_interpreter(monkeypatch, capsys, tmp_path):
    """--compile hands over to python -m fastdf.bench.compile in a child process without
    TRITON_INTERPRET (the kernels must be imported compiled), passing --json through."""
    import subprocess as sp

    from fastdf.bench import cli

    calls = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sp, "run", lambda cmd, env: calls.append((cmd, env)) or sp.CompletedProcess(cmd, 0))
    assert cli.main(["--compile", "--json", str(tmp_path / "c.json")]) == 0
    (cmd, env), = calls
    assert cmd[1:] == ["-m", "fastdf.bench.compile", "--json", str(tmp_path / "c.json")]
    assert "TRITON_INTERPRET" not in env
    with pytest.raises(SystemExit):
        cli.main(["--compile", "--suite", "cascade"])
    assert "--compile takes only --json" in capsys.readouterr().err


# ---------------------------------------------------------------------------- issue 11: a fair CPU timer

def test_cpu_timer_interleaves_providers_and_survives_a_failing_one():
    """Every provider is called in the same rounds (none is timed alone while the allocator
    or the machine is in another state), and one that fails mid-run is reported while the
    others keep their medians."""
    calls = []

    def provider(name, fail_at=None):
        def fn():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
        return fn

    out = core.time_cpu_interleaved({"a": provider("a"), "b": provider("b"), "c": provider("c", fail_at=4)},
                                    quick=True)
    assert isinstance(out["c"], RuntimeError) and "c broke" in str(out["c"])
    assert out["a"] > 0 and out["b"] > 0
    assert calls.count("c") == 4
    # Each round has its own order: a provider is never called twice in a row (that would
    # hand it a warm cache), and a and b are called equally often.
    assert calls.count("a") == calls.count("b") >= 3
    assert all(x != y for x, y in zip(calls, calls[1:]))
    last_c = len(calls) - 1 - calls[::-1].index("c")
    assert len(calls) - last_c > 3 and set(calls[last_c + 1:]) == {"a", "b"}
    # With every provider healthy each round is 3 calls, and every provider starts some.
    calls.clear()
    core.time_cpu_interleaved({"a": provider("a"), "b": provider("b"), "c": provider("c")}, quick=True)
    assert len(calls) % 3 == 0 and all(x != y for x, y in zip(calls, calls[1:]))
    assert {calls[i] for i in range(0, len(calls), 3)} == {"a", "b", "c"}


def test_repeat_reports_medians_and_the_range_of_each_ratio(monkeypatch, capsys):
    """--repeat N measures each case N times: the medians of the times and of the per-run
    ratios, with the ratios' range in the line, table and Markdown; a provider that failed
    in any run keeps its error; N < 1 is refused before running."""
    runs = [[dict(suite="s", case="c", provider="fastdf", ms=ms, GBps=10.0 / ms),
             dict(suite="s", case="c", provider="base", ms=b, fastdf_speedup=b / ms),
             dict(suite="s", case="c", provider="flaky", **({"error": "boom"} if i == 1 else
                                                             dict(ms=1.0, fastdf_speedup=1.0 / ms)))]
            for i, (ms, b) in enumerate([(1.0, 1.2), (2.0, 1.8), (1.0, 0.95)])]
    rows = core.combine_runs(runs)
    fast, base, flaky = rows
    assert fast["ms"] == 1.0 and fast["ms_runs"] == [1.0, 2.0, 1.0] and fast["GBps"] == 10.0
    assert base["fastdf_speedup"] == 0.95 and base["fastdf_speedup_range"] == [0.9, 1.2]
    assert flaky["error"] == "boom"
    assert "0.95x (0.90-1.20)" in core.case_line(rows) and "0.95x (0.90-1.20)" in core.table(rows)
    assert "0.95x (0.90-1.20)" in core.markdown(rows, dict(device="d", torch="t", date="x"))
    assert core.combine_runs(runs[:1]) is runs[0]

    from fastdf.bench import cli

    seen = []
    monkeypatch.setattr(core, "run", lambda names, device, quick, **kw: seen.append(kw["repeat"]) or [])
    monkeypatch.setattr(core, "environment", lambda device: dict.fromkeys(
        ("device", "torch", "triton", "cuda", "commit", "fastdf._C"), "x"))
    assert cli.main(["--device", "cpu", "--suite", "cascade", "--repeat", "3"]) == 0 and seen == [3]
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit):
            cli.main(["--repeat", bad])
        assert "--repeat" in capsys.readouterr().err


def test_fresh_processes_combines_whole_runs(tmp_path, capsys):
    """--fresh-processes: --repeat N as N child runs of the CLI, each case's lines echoed with
    its process, the cases combined as in-process repeats are (medians, ratio ranges, every
    run's time); refused without --repeat >= 2."""
    from fastdf.bench import cli

    runs = [[dict(suite="s", case=c, provider=p, ms=ms, **({} if p == "fastdf" else dict(fastdf_speedup=r)))
             for c in ("c1", "c2") for p, ms, r in (("fastdf", 1.0, None), ("base", k, k))]
            for k in (1.1, 0.9, 1.3)]
    runs[2] = runs[2][:2]  # the last run stopped after its first case
    rows = cli._combine_processes(runs)
    assert [(r["case"], r["provider"]) for r in rows] == [("c1", "fastdf"), ("c1", "base"), ("c2", "fastdf"),
                                                          ("c2", "base")]
    assert rows[1]["fastdf_speedup"] == 1.1 and rows[1]["fastdf_speedup_range"] == [0.9, 1.3]
    assert rows[3]["fastdf_speedup"] == 1.0 and rows[3]["fastdf_speedup_range"] == [0.9, 1.1]

    path = tmp_path / "r.json"
    assert cli.main(["--device", "cpu", "--suite", "cascade", "--quick", "--repeat", "2", "--fresh-processes",
                     "--no-progress", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[process 1/2] [1/" in out and "[process 2/2] [1/" in out
    data = json.loads(path.read_text())
    assert data["environment"]["fresh_processes"] is True and data["environment"]["repeat"] == 2
    timed = [r for r in data["results"] if "ms" in r]
    assert timed and all(len(r["ms_runs"]) == 2 for r in timed)
    assert all(len(r["fastdf_speedup_range"]) == 2 for r in timed if r["provider"] != "fastdf")
    for argv in (["--fresh-processes"], ["--fresh-processes", "--repeat", "1"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "--fresh-processes needs --repeat" in capsys.readouterr().err
