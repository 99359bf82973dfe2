"""The benchmark CLI runs on the CPU, reports ratios and survives a broken baseline."""

import json
import subprocess
import sys

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
