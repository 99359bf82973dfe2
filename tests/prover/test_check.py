"""pass@k against exact combinatorics; LeanREPLVerifier against a stand-in REPL that speaks
the Lean community REPL's JSON protocol (and can hang, crash or run out of memory); the
prove() loop end to end."""

import math
import sys
import textwrap
import time
from fractions import Fraction

import pytest

from fastdf.prover import LeanREPLVerifier, Verifier, VerifyResult, pass_at_k, prove
from fastdf.prover.sampler import Completion

STANDIN = textwrap.dedent('''
    """Stand-in for `lake exe repl`: JSON commands separated by blank lines on stdin, one
    pretty-printed JSON response plus a blank line per command on stdout."""
    import json, os, sys, time

    log = os.environ.get("STANDIN_LOG")
    if log:
        with open(log, "a") as f:
            f.write("start\\n")
    envs = 0

    def respond(obj):
        sys.stdout.write(json.dumps(obj, indent=2) + "\\n\\n")
        sys.stdout.flush()

    def handle(cmd):
        global envs
        src = cmd.get("cmd", "")
        if "env" in cmd and cmd["env"] >= envs:
            return respond({"message": f"Unknown environment {cmd['env']}"})
        if "BADHEADER" in src:
            return respond({"message": "unknown package 'Mathlb'"})
        if "HANG" in src:
            time.sleep(3600)
        if "CRASH" in src:
            sys.exit(3)
        if "ALLOC" in src:
            blob = bytearray(3 * 2**30)
            blob[::4096] = b"x" * len(blob[::4096])
        messages, sorries = [], []
        if "sorry" in src:
            sorries.append({"pos": {"line": 1, "column": 0}, "goal": "⊢ True"})
            messages.append({"severity": "warning", "pos": {"line": 1, "column": 8},
                             "data": "declaration uses 'sorry'"})
        if "bad_tactic" in src:
            messages.append({"severity": "error", "pos": {"line": 2, "column": 2},
                             "data": "unknown tactic 'bad_tactic'"})
        if "#eval" in src:
            messages.append({"severity": "info", "pos": {"line": 1, "column": 0}, "data": "2"})
        out = {"env": envs}
        envs += 1
        if messages:
            out["messages"] = messages
        if sorries:
            out["sorries"] = sorries
        respond(out)

    lines = []
    for line in sys.stdin:
        if line.strip():
            lines.append(line)
        elif lines:
            handle(json.loads("".join(lines)))
            lines = []
''')


@pytest.fixture
def repl(tmp_path, monkeypatch):
    script = tmp_path / "standin_repl.py"
    script.write_text(STANDIN)
    log = tmp_path / "starts.log"
    monkeypatch.setenv("STANDIN_LOG", str(log))

    def make(**kw):
        kw.setdefault("command", [sys.executable, str(script)])
        kw.setdefault("header", "import Mathlib")
        return LeanREPLVerifier(tmp_path, **kw)

    make.starts = lambda: len(log.read_text().splitlines()) if log.exists() else 0
    return make


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_exact_combinatorics():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert math.isclose(pass_at_k(n, c, k), float(exact_pass_at_k(n, c, k)), rel_tol=1e-12, abs_tol=1e-15)
    for n, c, k in [(2000, 7, 100), (4096, 1, 1), (3000, 2999, 64), (1000, 0, 10), (5000, 40, 1000)]:
        want = float(exact_pass_at_k(n, c, k))
        assert math.isclose(pass_at_k(n, c, k), want, rel_tol=1e-10, abs_tol=1e-15)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


@pytest.mark.parametrize("args,error,match", [
    ((0, 0, 1), ValueError, "n must be >= 1"), ((5, 6, 1), ValueError, r"c must be in \[0, n=5\]"),
    ((5, 1, 0), ValueError, r"k must be in \[1, n=5\]"), ((5, 1, 6), ValueError, "k must be in"),
    ((5.0, 1, 1), TypeError, "integers"),
])
def test_pass_at_k_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        pass_at_k(*args)


def test_verdicts_in_order(repl):
    proofs = ["theorem a : True := trivial", "theorem b : True := by bad_tactic", "theorem c : True := sorry",
              "#eval 1 + 1", "theorem d : True := trivial"]
    with repl(workers=2) as verifier:
        assert isinstance(verifier, Verifier)
        results = verifier.verify(proofs)
    assert [r.status for r in results] == ["pass", "fail", "fail", "pass", "pass"]
    assert [r.ok for r in results] == [True, False, False, True, True]
    assert results[1].messages[0]["data"] == "unknown tactic 'bad_tactic'"
    assert all(isinstance(r, VerifyResult) and r.time_s >= 0 for r in results)


def test_hangs_and_crashes_restart_without_losing_results(repl):
    proofs = ["ok 1", "HANG", "ok 2", "CRASH", "ok 3", "bad_tactic", "HANG", "ok 4"]
    t0 = time.monotonic()
    with repl(workers=2, timeout=1.0) as verifier:
        results = verifier.verify(proofs)
        again = verifier.verify(["ok 5", "ok 6"])  # the pool is healthy afterwards
    elapsed = time.monotonic() - t0
    assert [r.status for r in results] == ["pass", "timeout", "pass", "crash", "pass", "fail", "timeout", "pass"]
    assert "no answer within 1s" in results[1].messages[0]["data"]
    assert "exited with code 3" in results[3].messages[0]["data"]
    assert [r.status for r in again] == ["pass", "pass"]
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert repl.starts() >= 4  # 2 workers + a restart after each hang/crash (started lazily)


def test_memory_limit_kills_the_checker(repl):
    with repl(workers=1, memory_limit_mb=1024) as verifier:
        results = verifier.verify(["ALLOC", "ok"])
    assert [r.status for r in results] == ["crash", "pass"]
    assert "MemoryError" in results[0].messages[0]["data"]


def test_header_refused_and_restarts_per_process(repl):
    with repl(header="import Mathlb BADHEADER") as verifier:
        results = verifier.verify(["ok"])
    assert results[0].status == "error" and "header was refused" in results[0].messages[0]["data"]
    with repl(workers=1, max_proofs_per_process=2) as verifier:
        assert all(r.ok for r in verifier.verify(["a", "b", "c", "d", "e"]))
    assert repl.starts() == 1 + 3  # the refused header, then 5 proofs at 2 per process


def test_missing_repl_and_bad_arguments(repl, tmp_path):
    with repl(command=[str(tmp_path / "no-such-repl")]) as verifier:
        with pytest.raises(FileNotFoundError, match="cannot start the Lean REPL"):
            verifier.verify(["x"])
    with pytest.raises(ValueError, match="is not a directory"):
        LeanREPLVerifier(tmp_path / "missing")
    verifier = repl()
    verifier.close()
    with pytest.raises(RuntimeError, match="closed"):
        verifier.verify(["x"])


class ScriptedSampler:
    """Stands in for ProofSampler: fixed completions per prompt."""

    def __init__(self, completions):
        self.completions = completions
        self.calls = []

    def sample(self, prompts, num_samples, **kw):
        self.calls.append((prompts, num_samples, kw))
        return [[Completion(t, 1, "stop", [0]) for t in self.completions[p][:num_samples]] for p in prompts]


def test_prove_reports_pass_at_k(repl):
    theorems = ["theorem a : True := by", "theorem b : False := by"]
    sampler = ScriptedSampler({
        "FEWSHOT\n" + theorems[0]: [" trivial", " bad_tactic", " sorry", " trivial"],
        "FEWSHOT\n" + theorems[1]: [" bad_tactic", " sorry", " CRASH", " bad_tactic"],
    })
    with repl(workers=2) as verifier:
        report = prove(sampler, verifier, theorems, 4, prompt=lambda t: "FEWSHOT\n" + t, ks=[1, 2, 4],
                       temperature=0.8, stop=["```"])
    assert sampler.calls[0][1:] == (4, {"temperature": 0.8, "stop": ["```"]})
    a, b = report.theorems
    assert a.num_correct == 2 and b.num_correct == 0
    assert a.proofs[0] == "theorem a : True := by trivial"
    assert a.pass_at == {j: pass_at_k(4, 2, j) for j in (1, 2, 4)}
    assert b.pass_at == {1: 0.0, 2: 0.0, 4: 0.0}
    assert report.pass_at[1] == pytest.approx(0.25)
    assert "pass@4 = 0.500" in str(report)
    with pytest.raises(ValueError, match="every j in ks"):
        prove(sampler, verifier, theorems, 4, ks=[5])


def test_prove_bad_arguments(repl):
    sampler = ScriptedSampler({"t": [" trivial", " trivial"]})
    with repl(workers=1) as verifier:
        for kwargs, error, match in [
            (dict(k=True), TypeError, "k must be an int, got bool"),
            (dict(k=2.0), TypeError, "k must be an int, got float"),
            (dict(k=0), ValueError, "k must be >= 1, got 0"),
            (dict(k=2, ks=[1.5]), TypeError, "ks must be a list of ints"),
            (dict(k=2, ks="12"), TypeError, "ks must be a list of ints, got str"),
            (dict(k=2, theorems="t"), TypeError, "theorems must be a list of strings, got a single string"),
            (dict(k=2, theorems=["t", 3]), TypeError, r"theorems\[1\] is a int"),
            (dict(k=2, prompt="FEWSHOT"), TypeError, "prompt must be callable or None, got str"),
            (dict(k=2, proof=lambda t, c: None), TypeError, "proof must return a string"),
        ]:
            args = {"theorems": ["t"], **kwargs}
            with pytest.raises(error, match=match):
                prove(sampler, verifier, args.pop("theorems"), args.pop("k"), **args)

        class Short:  # a verifier that loses a result must not shift the others
            def verify(self, proofs):
                return verifier.verify(proofs)[:-1]

        two = ScriptedSampler({"t": [" trivial", " bad_tactic"]})
        with pytest.raises(RuntimeError, match="returned 1 results for 2 proofs"):
            prove(two, Short(), ["t"], 2)
