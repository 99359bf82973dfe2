"""LeanREPLVerifier against stand-in REPLs that misbehave: stop reading, stop answering,
die mid-answer, answer garbage / a list / null / a string / malformed messages / extra or
stale objects, or close stdout while alive. Every proof must get its own result (never
another proof's answer), nothing may wait past its deadline, and no stand-in process may
outlive the verifier."""

import contextlib
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from fastdf.prover import LeanREPLVerifier

# Speaks the REPL protocol; a marker in a command's text picks a misbehaviour. Every
# normal answer carries an info message "echo:<command text>", so a test can tell which
# command an answer belongs to. argv[1] == "noread": stop reading stdin after the header.
# argv[1] == "lake": run itself as a child (as `lake exe repl` does) and wait.
FAULTY = textwrap.dedent('''
    import json, os, subprocess, sys, time

    with open(os.environ["STANDIN_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "lake":
        sys.exit(subprocess.call([sys.executable, __file__]))
    envs = 0

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def answer(extra=None):
        global envs
        out = {"env": envs}
        envs += 1
        out.update(extra or {})
        return json.dumps(out, indent=2) + "\\n\\n"

    def handle(cmd):
        src = cmd.get("cmd", "")
        echo = {"messages": [{"severity": "info", "data": "echo:" + src}]}
        if "HANG" in src:
            time.sleep(3600)
        if "CRASHMID" in src:
            write(\'{"env": 1, "messa\')
            os._exit(4)
        if "GARBAGE" in src:
            return write("this is not json\\n\\n")
        if "NOISE" in src:  # a log line first, then the answer: tolerated
            return write("Processing the command\\n\\n" + answer(echo))
        if "LIST" in src:
            return write("[1, 2]\\n\\n")
        if "STRING" in src:
            return write(\'"ok"\\n\\n\')
        if "MSGNULL" in src:
            return write(answer({"messages": None}))
        if "NULL" in src:
            return write("null\\n\\n")
        if "MSGINTS" in src:
            return write(answer({"messages": [1, 2]}))
        if "NOENV" in src:
            return write(\'{"messages": []}\\n\\n\')
        if "EXTRA" in src:
            return write(answer(echo) + answer(echo))
        if "LATE" in src:  # a second copy of the answer, a moment later
            text = answer(echo)
            write(text)
            time.sleep(0.3)
            return write(text)
        if "REPEAT" in src:  # answers with the previous command's env id
            global envs
            envs -= 1
            return write(answer(echo))
        if "SKIP" in src:  # answers with an env id from the future
            envs += 5
            return write(answer(echo))
        if "BIGLINE" in src:  # an endless answer
            while True:
                write("x" * 4096)
        if "CLOSEOUT" in src:
            os.close(1)
            time.sleep(3600)
        if "NOREAD" in src:
            write(answer(echo))
            time.sleep(3600)
        if "bad_tactic" in src:
            echo["messages"].append({"severity": "error", "data": "unknown tactic"})
        write(answer(echo))

    lines = []
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            lines.append(line)
        elif lines:
            handle(json.loads("".join(lines)))
            lines = []
            if mode == "noread":
                time.sleep(3600)
''')


def alive(pid):
    """Whether pid is a running process (a zombie counts as dead: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    script = tmp_path / "faulty_repl.py"
    script.write_text(FAULTY)
    pids = tmp_path / "pids"
    monkeypatch.setenv("STANDIN_PIDS", str(pids))

    def make(mode="", **kw):
        kw.setdefault("command", [sys.executable, str(script)] + ([mode] if mode else []))
        kw.setdefault("header", "import Mathlib")
        kw.setdefault("timeout", 1.0)
        kw.setdefault("startup_timeout", 5.0)
        return LeanREPLVerifier(tmp_path, **kw)

    def started():
        return [int(p) for p in pids.read_text().split()] if pids.exists() else []

    make.started = started
    make.script = script
    yield make
    # The process table: no stand-in survives its verifier.
    deadline = time.monotonic() + 5
    while any(alive(p) for p in started()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in started() if alive(p)], "a REPL process outlived its verifier"


def echoes(result):
    return [m["data"] for m in result.messages if str(m.get("data", "")).startswith("echo:")]


FAULTS = [  # marker, status, reason pattern
    ("HANG", "timeout", r"no answer within 1s"),
    ("CRASHMID", "crash", r"exited with code 4 after \d+ bytes of an unfinished answer"),
    ("GARBAGE", "protocol", r"no answer within 1s; it wrote only non-JSON text: this is not json"),
    ("LIST", "protocol", r"JSON list instead of an object"),
    ("NULL", "protocol", r"JSON null instead of an object"),
    ("STRING", "protocol", r"JSON str instead of an object"),
    ("MSGNULL", "protocol", r"messages are not a list of objects: null"),
    ("MSGINTS", "protocol", r"messages are not a list of objects: \[1, 2\]"),
    ("NOENV", "protocol", r"neither an env nor a message"),
    ("EXTRA", "protocol", r"more than one answer"),
    ("REPEAT", "protocol", r"answered for environment 0, an earlier command.s, where 1 was next"),  # after the retry
    ("SKIP", "protocol", r"answered for environment 7 where 2 was next"),
    ("CLOSEOUT", "protocol", r"closed its output but kept running"),
]


@pytest.mark.parametrize("marker,status,reason", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_is_reported_on_its_own_proof(faulty, marker, status, reason):
    proofs = ["ok 1", f"theorem {marker}", "ok 2", "bad_tactic 3"]
    t0 = time.monotonic()
    sent_again = marker == "REPEAT"  # an earlier command's id: the proof goes to a fresh process once
    with pytest.warns(RuntimeWarning, match="sent the proof again") if sent_again else contextlib.nullcontext():
        with faulty(workers=1) as verifier:
            results = verifier.verify(proofs)
            pids = faulty.started()
            assert any(alive(p) for p in pids)  # the pool keeps a healthy process for later
    elapsed = time.monotonic() - t0
    bad = results[1]
    assert (bad.ok, bad.status) == (False, status), bad
    assert bad.reason and re.search(reason, bad.reason), bad.reason
    assert bad.messages == [{"severity": "error", "data": bad.reason}]
    # The other proofs get their own answers, whatever happened in between.
    assert [r.status for r in results] == ["pass", status, "pass", "fail"]
    assert echoes(results[0]) == ["echo:ok 1"]
    assert echoes(results[2]) == ["echo:ok 2"] and echoes(results[3]) == ["echo:bad_tactic 3"]
    assert results[3].reason == "Lean error: unknown tactic" and results[0].reason == ""
    assert len(pids) >= 2  # the faulty process was replaced
    assert elapsed < 6, f"took {elapsed:.1f}s"


def test_noise_before_an_answer_is_skipped(faulty):
    with faulty(workers=1) as verifier:
        results = verifier.verify(["NOISE a", "ok", "NOISE b"])
    assert [r.status for r in results] == ["pass"] * 3
    assert [echoes(r) for r in results] == [["echo:NOISE a"], ["echo:ok"], ["echo:NOISE b"]]
    assert len(faulty.started()) == 1  # noise is not a fault


def test_late_extra_answer_never_reaches_the_next_proof(faulty):
    # The duplicate arrives while the next proof is (or is about to be) in flight: either
    # way that proof is sent again to a fresh process and gets its own answer.
    with pytest.warns(RuntimeWarning, match="restarted the REPL"):
        with faulty(workers=1) as verifier:
            first = verifier.verify(["LATE a"])
            time.sleep(0.05)
            results = verifier.verify(["ok b", "ok c"])
    assert first[0].status == "pass" and echoes(first[0]) == ["echo:LATE a"]
    assert [echoes(r) for r in results] == [["echo:ok b"], ["echo:ok c"]]
    assert [r.status for r in results] == ["pass", "pass"]


def test_a_repl_that_stops_reading_misses_the_write_deadline(faulty):
    big = "theorem big : True := by\n" + "  trivial\n" * 200_000  # ~2 MB: far more than a pipe holds
    t0 = time.monotonic()
    with faulty("noread", workers=1, timeout=0.5) as verifier:
        results = verifier.verify([big, "ok"])
    assert time.monotonic() - t0 < 5
    assert results[0].status == "timeout" and not results[0].ok
    assert "stopped reading its input" in results[0].reason and "bytes of the command sent in 0.5s" in results[0].reason
    assert results[1].status == "timeout" and "no answer within 0.5s" in results[1].reason  # reads the header only


def test_a_repl_that_stops_reading_after_an_answer(faulty):
    with faulty(workers=1) as verifier:
        results = verifier.verify(["NOREAD x", "ok after"])
    assert results[0].status == "pass"
    assert results[1].status == "timeout" and echoes(results[1]) == []


def test_whole_process_group_is_killed(faulty):
    # As with `lake exe repl`: the REPL is a child of the process started.
    with faulty("lake", workers=2) as verifier:
        results = verifier.verify(["ok 1", "HANG", "ok 2", "ok 3"])
        assert [r.status for r in results] == ["pass", "timeout", "pass", "pass"]
        started = faulty.started()
        assert len(started) == 4  # 2 launchers and their REPLs; the hung pair is not needed again
        # the hung launcher and its REPL child are gone already, the other pair still serves
        # (a killed grandchild is reparented and reaped asynchronously: allow it a moment)
        deadline = time.monotonic() + 3
        while sum(alive(p) for p in started) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(alive(p) for p in started) == 2
    # the fixture checks that every launcher and REPL is gone


def test_header_faults_become_results(faulty):
    with faulty(header="import Mathlib LIST", workers=1) as verifier:
        results = verifier.verify(["ok"])
    assert results[0].status == "protocol"
    assert results[0].reason.startswith("while checking the header: the REPL answered with a JSON list")


def test_interpreter_exits_and_kills_the_repls(faulty, tmp_path):
    # A verify stuck on a slow proof in a background (daemon) thread, and no close():
    # Python must still exit at once, and the REPLs must die with it. (A non-daemon thread
    # is waited for by Python itself, until the proof's deadline.)
    program = textwrap.dedent(f'''
        import sys, threading, time
        from fastdf.prover import LeanREPLVerifier
        v = LeanREPLVerifier({str(tmp_path)!r}, command=[sys.executable, {str(faulty.script)!r}],
                             header="import Mathlib", timeout=60, workers=2)
        threading.Thread(target=v.verify, args=(["HANG 1", "HANG 2"],), daemon=True).start()
        time.sleep(1.0)
        print("exiting", flush=True)
    ''')
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "exiting" in out.stdout
    assert time.monotonic() - t0 < 15
    assert len(faulty.started()) == 2


def test_close_kills_idle_and_busy_processes(faulty):
    verifier = faulty(workers=2)
    verifier.verify(["ok 1", "ok 2"])
    assert len(faulty.started()) == 2 and all(alive(p) for p in faulty.started())
    verifier.close()
    assert not any(alive(p) for p in faulty.started())
    verifier.close()  # idempotent


def test_garbage_collected_verifier_kills_its_repls(faulty):
    import gc

    verifier = faulty(workers=2)
    verifier.verify(["ok 1", "ok 2"])
    pids = faulty.started()
    assert all(alive(p) for p in pids)
    del verifier
    gc.collect()
    assert not any(alive(p) for p in pids)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(timeout=float("inf")), ValueError, "timeout must be a finite number of seconds > 0, got inf"),
    (dict(timeout=float("nan")), ValueError, "timeout must be a finite"),
    (dict(timeout="10"), TypeError, "timeout must be a number of seconds, got str"),
    (dict(timeout=0), ValueError, "timeout must be"),
    (dict(startup_timeout=-1.0), ValueError, "startup_timeout must be"),
    (dict(startup_timeout=True), TypeError, "startup_timeout must be a number"),
    (dict(workers=-1), ValueError, "workers must be >= 1, got -1"),
    (dict(workers=0), ValueError, "workers must be >= 1"),
    (dict(workers=2.5), TypeError, "workers must be an int or None, got float"),
    (dict(workers=True), TypeError, "workers must be an int"),
    (dict(command=[]), ValueError, "command must not be empty"),
    (dict(command="lake exe repl"), TypeError, "command must be a list of strings"),
    (dict(command=["lake", 1]), TypeError, "command must be a list of strings"),
    (dict(memory_limit_mb=0), ValueError, "memory_limit_mb must be >= 1"),
    (dict(memory_limit_mb=1.5), TypeError, "memory_limit_mb must be an int"),
    (dict(max_proofs_per_process=0), ValueError, "max_proofs_per_process must be >= 1"),
    (dict(header=5), TypeError, "header must be a string or None"),
    (dict(env={"A": 1}), TypeError, "env must map str to str; entry 'A'"),
    (dict(env=["A=1"]), TypeError, "env must be a mapping"),
])
def test_bad_constructor_arguments(faulty, kwargs, error, match):
    with pytest.raises(error, match=match):
        faulty(**kwargs)
    assert faulty.started() == []


def test_bad_verify_arguments_start_nothing(faulty, tmp_path):
    with pytest.raises(TypeError, match="project_dir must be a path"):
        LeanREPLVerifier(5)
    with faulty() as verifier:
        with pytest.raises(TypeError, match="got a single str"):
            verifier.verify("abc")
        with pytest.raises(TypeError, match="got a single bytes"):
            verifier.verify(b"abc")
        with pytest.raises(TypeError, match=r"proofs\[1\] is a int"):
            verifier.verify(["ok", 1])
        with pytest.raises(TypeError, match="proofs must be a list of strings, got int"):
            verifier.verify(3)
        with pytest.raises(TypeError, match="progress must be a bool"):
            verifier.verify(["ok"], progress="yes")
        assert verifier.verify([]) == []
        assert verifier.verify(p for p in ["ok"])[0].ok  # any iterable of strings
    assert len(faulty.started()) == 1


def test_an_endless_answer_is_cut_off(faulty, monkeypatch):
    import fastdf.prover.check as check

    monkeypatch.setattr(check, "_MAX_ANSWER_BYTES", 100_000)
    with faulty(workers=1, timeout=5.0) as verifier:
        t0 = time.monotonic()
        results = verifier.verify(["BIGLINE", "ok"])
    assert time.monotonic() - t0 < 4  # stopped by the size limit, not the deadline
    assert results[0].status == "protocol" and "more than 100,000 bytes without a blank line" in results[0].reason
    assert results[1].status == "pass" and echoes(results[1]) == ["echo:ok"]
