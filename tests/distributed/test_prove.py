"""Proof search over 2 gloo ranks (tiny Llama, stand-in Lean REPL) against one process;
the CLI end to end (one process, 2 ranks, resumed after a crash)."""

import json
import os
import pickle
import shlex
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.distributed import _prove_worker as worker
from tests.distributed._spawn import run_ranks
from tests.prover.test_check import STANDIN

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_prove_and_cli_over_two_ranks(tmp_path, monkeypatch):
    """prove and ProofSampler.sample(distributed=True) on 2 ranks equal one process (seeded
    per theorem); a failing rank raises everywhere; `python -m fastdf.prover` writes the
    same file on 1 process and 2 ranks; a run cut mid-line resumes, redoing only the
    theorems not yet written."""
    from fastdf.prover import cli, prove
    from tests.prover.conftest import make_model, make_tokenizer

    (tmp_path / "standin_repl.py").write_text(STANDIN)
    sampler, verifier = worker.setup(tmp_path)
    with verifier:
        report = prove(sampler, verifier, worker.THEOREMS, 3, ks=[1, 3], proof=worker.parity_proof, **worker.SAMPLE)
    assert {t.num_correct for t in report.theorems} != {report.theorems[0].num_correct}  # verdicts vary
    sample = sampler.sample(worker.THEOREMS, num_samples=2, **worker.SAMPLE)
    (tmp_path / "single.pkl").write_bytes(pickle.dumps(
        {"prove": worker.summary(report), "sample": [[c.token_ids for c in per] for per in sample]}))

    tokenizer = make_tokenizer()
    make_model("llama", len(tokenizer), dtype=__import__("torch").float32).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "theorems.jsonl", "w") as f:
        for i, t in enumerate(worker.THEOREMS):
            f.write(json.dumps({"theorem": t, "id": f"t{i}"}) + "\n\n")
    args = ["--theorems", str(tmp_path / "theorems.jsonl"), "--model", str(tmp_path / "model"), "--k", "3",
            "--ks", "1,3", "--max-new-tokens", "6", "--temperature", "0.9", "--seed", "5", "--chunk-size", "2",
            "--project-dir", str(tmp_path), "--header", "import Mathlib", "--workers", "1", "--no-progress",
            "--repl-command", shlex.join([sys.executable, str(tmp_path / "standin_repl.py")])]
    (tmp_path / "cli_args.json").write_text(json.dumps(args))

    one = tmp_path / "one.jsonl"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fastdf.prover", *args, "--output", str(one)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 theorems; pass@1 = " in done.stdout
    lines = one.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == list(range(5)) and [r["id"] for r in rows] == [f"t{i}" for i in range(5)]
    assert all(len(r["samples"]) == 3 and set(r["pass_at"]) == {"1", "3"} for r in rows)
    assert rows[2]["num_correct"] == 0 and rows[0]["num_correct"] == 3  # the stand-in fails "bad_tactic"

    run_ranks(worker.all_checks, 2, str(tmp_path), timeout=240)
    assert (tmp_path / "two_ranks.jsonl").read_text() == one.read_text()

    # A crash mid-write: 2 lines and half of the third survive; the rerun redoes 2, 3, 4 only.
    text = one.read_text()
    cut = len(lines[0]) + len(lines[1]) + 2 + len(lines[2]) // 2
    one.write_text(text[:cut])
    seen = []
    real = prove

    def spy(sampler, verifier, theorems, k, **kw):
        seen.extend(theorems)
        return real(sampler, verifier, theorems, k, **kw)

    monkeypatch.setattr(sys.modules["fastdf.prover.prove"], "prove", spy)
    assert cli.main(args + ["--output", str(one)]) == 0
    assert seen == worker.THEOREMS[2:]
    assert one.read_text() == text


def test_cli_bad_arguments_fail_before_loading(tmp_path, capsys):
    from fastdf.prover import cli

    (tmp_path / "t.jsonl").write_text('{"theorem": "a"}\n{"id": 3}\n')
    base = ["--theorems", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--model", str(tmp_path),
            "--repl-command", sys.executable]
    for extra, match in [(["--k", "0"], "--k must be >= 1"), (["--ks", "1,9", "--k", "4"], r"--ks must be in \[1, k=4\]"),
                         (["--model", str(tmp_path / "none")], "--model .* is not a directory"),
                         (["--repl-command", "no-such-repl-xyz"], "not an executable"),
                         ([], r"t.jsonl:2: expected an object with a string \"theorem\"")]:
        with pytest.raises(SystemExit) as err:
            cli.main(base + extra)
        assert err.value.code == 2
        assert __import__("re").search(match, capsys.readouterr().err), extra
    (tmp_path / "t.jsonl").write_text('{"theorem": "a"}\n')
    (tmp_path / "o.jsonl").write_text('{"index": 0, "theorem": "b", "k": 32}\n')
    with pytest.raises(SystemExit):
        cli.main(base)
    assert "does not match --theorems" in capsys.readouterr().err
