"""Checking proofs: the pass@k estimator, a ``Verifier`` protocol, and a pool of Lean
community REPL processes (https://github.com/leanprover-community/repl).

Pointing ``LeanREPLVerifier`` at a Lean + Mathlib project
----------------------------------------------------------
1. Have a Lean 4 project whose ``lakefile`` requires Mathlib and the REPL, e.g. in
   ``lakefile.lean``::

       require mathlib from git "https://github.com/leanprover-community/mathlib4" @ "v4.x.y"
       require REPL from git "https://github.com/leanprover-community/repl" @ "v4.x.y"

   (use the same Lean toolchain for both), then run ``lake exe cache get`` and
   ``lake build`` in it once, so ``lake exe repl`` starts without compiling.
2. ``LeanREPLVerifier("/path/to/project")`` starts ``lake exe repl`` there (``command=``
   overrides, e.g. ``["/path/to/repl/.lake/build/bin/repl"]`` with ``cwd`` the project),
   sends ``header`` (default ``import Mathlib`` and friends) once per process, and checks
   each proof in that environment.

Protocol: each command is one JSON object followed by a blank line on the REPL's stdin
(``{"cmd": "...", "env": 0}``); each response is a JSON object followed by a blank line on
its stdout, holding ``env`` (the id of the environment the command created: 0, 1, 2, ...
in the order of the commands of one process) or ``message`` (the command was refused),
``messages`` (``severity``: info/warning/error) and ``sorries``. A proof passes when no
message has severity "error", nothing is reported in ``sorries`` and no message says the
declaration uses ``sorry``.

Robustness: every write to and read from a REPL has a deadline (``timeout`` seconds per
proof for sending it and reading its answer, ``startup_timeout`` for the header), through
non-blocking pipes and ``selectors``, with no reader threads. A process that misses a
deadline, dies, or breaks the protocol is killed (its whole process group: ``lake`` runs
the REPL as a child) and restarted for the next proof; the proof's result says why
(``ok=False``, ``status`` and ``reason``). An answer is accepted only if it is a JSON object
of the expected shape whose ``env`` is the next id of that process, so an answer can never
be credited to another proof: an answer that repeats an earlier id, or output left over
after an answer, means the process is out of step, and it is replaced (the proof is sent
again to a fresh process once). Text on stdout that is not JSON (some REPL versions log
the commands they process there) is skipped. Known limit: a REPL that invents a fresh
``env`` id for an extra answer cannot be told apart from a real answer, as the protocol
echoes nothing of the command.

Limits: ``memory_limit_mb`` sets ``RLIMIT_AS`` (virtual memory) on the process and its
children. Importing Mathlib maps several GB of ``.olean`` files, so give it generous room
(32 GB is a safe start) or leave it None. Processes are killed by :meth:`close`, when the
verifier is garbage-collected and at interpreter exit.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import operator
import os
import resource
import selectors
import signal
import subprocess
import threading
import time
import warnings
import weakref
from typing import Mapping, Protocol, Sequence, runtime_checkable

DEFAULT_HEADER = "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\n\nopen BigOperators Real Nat Topology Rat"

STATUSES = ("pass", "fail", "timeout", "crash", "error", "protocol")

_CHUNK = 1 << 16
_MAX_ANSWER_BYTES = 256 << 20  # one answer (or the non-JSON text before it) larger than this is a fault
_STDERR_TAIL = 4000
_EXIT_GRACE_S = 1.0  # how long a process that closed a pipe gets to exit before it counts as alive


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator: ``1 - C(n-c, k) / C(n, k)`` for ``n`` samples of which
    ``c`` are correct, as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (stable for n in
    the thousands, where the binomials overflow floats)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool):
            raise TypeError(f"pass_at_k takes integers n, c, k: {name} is a bool")
    try:
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError as err:
        raise TypeError(f"pass_at_k takes integers n, c, k: {err}") from None
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclasses.dataclass
class VerifyResult:
    """The verdict on one proof.

    ok: the proof checks (no error, no sorry).
    status: "pass", "fail" (Lean errors or sorry), "timeout" (the REPL missed the deadline
        for reading the proof or answering), "crash" (the REPL died, e.g. out of memory),
        "error" (the REPL refused the command) or "protocol" (the REPL's output broke the
        protocol: not an object, a wrong shape or id, closed output).
    messages: the REPL's messages (dicts with severity, pos, data), or one describing
        the timeout/crash/fault.
    time_s: wall time spent on the proof.
    reason: why the proof did not pass, in words ("" when it passed).
    """

    ok: bool
    status: str
    messages: list = dataclasses.field(default_factory=list)
    time_s: float = 0.0
    reason: str = ""


@runtime_checkable
class Verifier(Protocol):
    """Anything that checks proofs: ``verify(proofs) -> [VerifyResult]`` in input order."""

    def verify(self, proofs: Sequence[str]) -> list[VerifyResult]: ...


def _excerpt(text, limit=200):
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _shape_fault(response) -> str | None:
    """Why ``response`` is not a well-formed REPL answer, or None."""
    if not isinstance(response, dict):
        kind = "null" if response is None else type(response).__name__
        return f"the REPL answered with a JSON {kind} instead of an object: {_excerpt(json.dumps(response))}"
    if "env" in response:
        env = response["env"]
        if isinstance(env, bool) or not isinstance(env, int):
            return f"the REPL's answer has a non-integer env: {_excerpt(json.dumps(env))}"
    elif not isinstance(response.get("message"), str):
        return f"the REPL's answer has neither an env nor a message: {_excerpt(json.dumps(response))}"
    if "messages" in response:
        messages = response["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return f"the REPL's messages are not a list of objects: {_excerpt(json.dumps(messages))}"
    if "sorries" in response and not isinstance(response["sorries"], list):
        return f"the REPL's sorries are not a list: {_excerpt(json.dumps(response['sorries']))}"
    return None


def verdict(response: dict) -> tuple[bool, str]:
    """(ok, status) of one well-formed REPL response."""
    if "messages" not in response and "message" in response:
        return False, "error"
    messages = response.get("messages") or []
    errors = [m for m in messages if m.get("severity") == "error"]
    sorry = bool(response.get("sorries")) or any("declaration uses 'sorry'" in str(m.get("data", "")) for m in messages)
    ok = not errors and not sorry
    return ok, "pass" if ok else "fail"


def _reason(response: dict, status: str) -> str:
    if status == "pass":
        return ""
    if status == "error":
        return f"the REPL refused the command: {_excerpt(response.get('message'))}"
    errors = [m for m in response.get("messages") or [] if m.get("severity") == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"Lean error: {_excerpt(str(errors[0].get('data', '')))}{more}"
    return "the proof uses sorry"


class _Fault(Exception):
    """A REPL process missed a deadline, died or broke the protocol; it must be replaced."""

    def __init__(self, status: str, reason: str):
        super().__init__(status, reason)
        self.status, self.reason = status, reason


class _OutOfStep(_Fault):
    """Output that answers an earlier command: the process is out of step, but the command
    just sent is not to blame (it goes to a fresh process)."""


class _Repl:
    """One REPL process behind non-blocking pipes. Nothing here blocks past a deadline."""

    def __init__(self, command, cwd, env, memory_limit_mb):
        limit = None if memory_limit_mb is None else int(memory_limit_mb) << 20

        def limits():
            # Runs in the child between fork and exec: only the already-imported module.
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            bufsize=0, start_new_session=True, preexec_fn=limits if limit is not None else None,
        )
        self.pid = self.proc.pid
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            os.set_blocking(stream.fileno(), False)
        self._partial = bytearray()  # stdout after the last newline
        self._block: list[bytes] = []  # lines of the answer being read
        self._block_bytes = 0
        self._blocks: collections.deque = collections.deque()  # complete blocks, not yet consumed
        self._noise: list[str] = []  # non-JSON blocks skipped while waiting for the current answer
        self._stderr = b""
        self._out_eof = self._err_eof = False
        self.next_env = 0  # the env id the next successful command must get
        self.env = None  # the header's environment
        self.ready = False  # the header has been checked
        self.killed = False
        self.checked = 0

    # ---------------------------------------------------------------- pipes

    def _on_stdout(self, chunk: bytes):
        # Only the new chunk is scanned, so a long line arriving in many chunks costs
        # linear time.
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._partial += chunk[start:]
                break
            line = bytes(self._partial) + chunk[start:end]
            self._partial = bytearray()
            start = end + 1
            if line.strip():
                self._block.append(line)
                self._block_bytes += len(line)
            elif self._block:
                self._blocks.append(b"\n".join(self._block))
                self._block, self._block_bytes = [], 0
        if self._block_bytes + len(self._partial) > _MAX_ANSWER_BYTES:
            raise _Fault("protocol", f"the REPL wrote more than {_MAX_ANSWER_BYTES:,} bytes without a blank line")

    def _read(self, stream) -> int:
        """Read what is waiting on ``stream``: the number of bytes, 0 if none, -1 at its end."""
        try:
            chunk = os.read(stream.fileno(), _CHUNK)
        except BlockingIOError:
            return 0
        except OSError:
            chunk = b""
        if not chunk:
            if stream is self.proc.stdout:
                self._out_eof = True
            else:
                self._err_eof = True
            return -1
        if stream is self.proc.stdout:
            self._on_stdout(chunk)
        else:
            self._stderr = (self._stderr + chunk)[-_STDERR_TAIL:]
        return len(chunk)

    def _drain(self):
        """Take in whatever output is already waiting, without waiting."""
        for stream, done in ((self.proc.stdout, lambda: self._out_eof), (self.proc.stderr, lambda: self._err_eof)):
            for _ in range(1024):  # bounded: a process writing without pause cannot keep us here
                if done() or self._read(stream) <= 0:
                    break

    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", errors="replace").strip()[-500:]

    def _gone(self, deadline: float, event: str) -> _Fault:
        """The fault for a process that closed one of its pipes: a crash if it exits soon."""
        try:
            code = self.proc.wait(timeout=max(0.0, min(_EXIT_GRACE_S, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            return _Fault("protocol", f"the REPL {event} but kept running")
        self._drain()  # the last words on stderr (e.g. the MemoryError) are still in the pipe
        tail = self.stderr_tail()
        pending = self._block_bytes + len(self._partial)
        partial = f" after {pending} bytes of an unfinished answer" if pending else ""
        return _Fault("crash", f"the REPL exited with code {code}{partial}" + (f": {tail}" if tail else ""))

    # ---------------------------------------------------------------- protocol

    def _pending(self) -> str:
        """Output the process wrote beyond the answers consumed so far."""
        parts = [b.decode("utf-8", errors="replace") for b in self._blocks]
        parts += [b"\n".join(self._block).decode("utf-8", errors="replace"),
                  bytes(self._partial).decode("utf-8", errors="replace")]
        return "\n".join(p for p in parts if p.strip())

    def ask(self, command: dict, timeout: float) -> dict:
        """Send one command and return its answer, within ``timeout`` seconds in all.

        Raises _OutOfStep if the process wrote anything after its previous answer (checked
        before sending), _Fault for a missed deadline, death or malformed answer."""
        deadline = time.monotonic() + timeout
        self._drain()
        stale = self._pending()
        if stale:
            raise _OutOfStep("protocol", f"the REPL wrote output after its previous answer: {_excerpt(stale)}")
        if self._out_eof:
            raise self._gone(deadline, "closed its output")
        data = memoryview((json.dumps(command) + "\n\n").encode())
        total, self._noise = len(data), []
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.proc.stdin, selectors.EVENT_WRITE)
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not self._err_eof:
                sel.register(self.proc.stderr, selectors.EVENT_READ)
            while True:
                if not data:
                    answer = self._next_answer()
                    if answer is not None:
                        return answer
                if self._out_eof:
                    raise self._gone(deadline, "closed its output")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if data:
                        raise _Fault("timeout", f"the REPL stopped reading its input: {total - len(data)} of "
                                                f"{total} bytes of the command sent in {timeout:g}s")
                    noise = f"; it wrote only non-JSON text: {_excerpt(self._noise[-1])}" if self._noise else ""
                    raise _Fault("protocol" if noise else "timeout", f"no answer within {timeout:g}s{noise}")
                for key, _ in sel.select(remaining):
                    if key.fileobj is self.proc.stdin:
                        try:
                            sent = os.write(self.proc.stdin.fileno(), data[:_CHUNK])
                        except BlockingIOError:
                            continue
                        except OSError:
                            raise self._gone(deadline, "closed its input") from None
                        data = data[sent:]
                        if not data:
                            sel.unregister(self.proc.stdin)
                    elif self._read(key.fileobj) < 0:
                        sel.unregister(key.fileobj)
        finally:
            sel.close()

    def _next_answer(self) -> dict | None:
        """The next complete answer, validated, or None if none is complete yet."""
        while self._blocks:
            text = self._blocks.popleft().decode("utf-8", errors="replace")
            try:
                response = json.loads(text)
            except (ValueError, RecursionError):
                self._noise.append(text)  # a log line, not an answer
                if sum(map(len, self._noise)) > _MAX_ANSWER_BYTES:
                    raise _Fault("protocol", f"the REPL wrote more than {_MAX_ANSWER_BYTES:,} bytes of non-JSON "
                                             f"text: {_excerpt(text)}") from None
                continue
            fault = _shape_fault(response)
            if fault:
                raise _Fault("protocol", fault)
            if "env" in response:
                env = response["env"]
                if env < self.next_env:
                    raise _OutOfStep("protocol", f"the REPL answered for environment {env}, an earlier command's, "
                                                 f"where {self.next_env} was next")
                if env != self.next_env:
                    raise _Fault("protocol", f"the REPL answered for environment {env} where {self.next_env} was next")
                self.next_env += 1
            self._drain()
            if self._pending():
                raise _Fault("protocol", f"the REPL wrote more than one answer: {_excerpt(self._pending())}")
            return response
        return None

    def kill(self):
        """Kill the process group and reap the process (bounded waits only). Once only:
        after the reap, the pid may belong to someone else."""
        if self.killed:
            return
        self.killed = True
        try:
            os.killpg(self.pid, signal.SIGKILL)  # lake runs the repl as a child: kill both
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def _kill_all(live: set, lock: threading.Lock):
    with lock:
        repls = list(live)
        live.clear()
    for repl in repls:
        repl.kill()


def _positive_seconds(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
    return float(value)


def _optional_count(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class LeanREPLVerifier:
    """A pool of Lean REPL processes checking proofs in parallel (see the module docstring
    for how to point it at a Lean + Mathlib project, and for the deadlines).

    Args:
        project_dir: the Lean project the REPL runs in (its working directory).
        command: the REPL command line, a list of strings (default ``lake exe repl``).
        header: sent once per process (imports, options); proofs run in its environment.
            None or "" sends each proof on its own.
        workers: processes in the pool (default: half the CPUs, at least 1).
        timeout: seconds per proof (sending it and reading its answer) before its process
            is killed and restarted.
        startup_timeout: seconds for a process to start and check the header.
        memory_limit_mb: ``RLIMIT_AS`` for each process and its children (None: no limit).
        max_proofs_per_process: restart a process after this many proofs (bounds the
            memory the REPL's growing environment table takes; None: never).
        env: environment variables for the processes, str to str (default: inherited).

    ``verify(proofs)`` returns one :class:`VerifyResult` per proof, in order; a proof that
    hangs, crashes its process or gets a malformed answer is reported as such (``ok=False``
    with a ``reason``) and the process restarted, so no result is lost or shifted and
    nothing waits past its deadline. Use as a context manager or call :meth:`close`; the
    processes are also killed when the verifier is garbage-collected or Python exits.
    """

    def __init__(self, project_dir, *, command=("lake", "exe", "repl"), header: str | None = DEFAULT_HEADER,
                 workers: int | None = None, timeout: float = 60.0, startup_timeout: float = 600.0,
                 memory_limit_mb: int | None = None, max_proofs_per_process: int | None = None,
                 env: Mapping[str, str] | None = None):
        if not isinstance(project_dir, (str, os.PathLike)):
            raise TypeError(f"project_dir must be a path, got {type(project_dir).__name__}")
        if not os.path.isdir(project_dir):
            raise ValueError(f"project_dir {os.fspath(project_dir)!r} is not a directory")
        if isinstance(command, (str, bytes)) or not isinstance(command, (list, tuple)):
            raise TypeError(f"command must be a list of strings (e.g. ['lake', 'exe', 'repl']), got {command!r}")
        if not command:
            raise ValueError("command must not be empty: it is the REPL's command line, e.g. ['lake', 'exe', 'repl']")
        if not all(isinstance(c, (str, os.PathLike)) for c in command):
            raise TypeError(f"command must be a list of strings, got {command!r}")
        if header is not None and not isinstance(header, str):
            raise TypeError(f"header must be a string or None, got {type(header).__name__}")
        if env is not None:
            if not isinstance(env, Mapping):
                raise TypeError(f"env must be a mapping of str to str or None, got {type(env).__name__}")
            bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise TypeError(f"env must map str to str; entry {bad[0]!r} does not")
        self.project_dir = os.fspath(project_dir)
        self.command = [os.fspath(c) for c in command]
        self.header = header or None
        self.workers = _optional_count("workers", workers) or max(1, (os.cpu_count() or 2) // 2)
        self.timeout = _positive_seconds("timeout", timeout)
        self.startup_timeout = _positive_seconds("startup_timeout", startup_timeout)
        self.memory_limit_mb = _optional_count("memory_limit_mb", memory_limit_mb)
        self.max_proofs_per_process = _optional_count("max_proofs_per_process", max_proofs_per_process)
        self.env = None if env is None else dict(env)
        self._idle: list = []  # started processes waiting for work
        self._live: set = set()  # every started process not yet killed
        self._live_lock = threading.Lock()
        self._verify_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _kill_all, self._live, self._live_lock)
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop every REPL process (killed and reaped)."""
        self._closed = True
        self._idle = []
        self._finalizer()

    # ---------------------------------------------------------------- processes

    def _kill(self, repl: _Repl | None):
        if repl is None:
            return
        with self._live_lock:
            self._live.discard(repl)
        repl.kill()

    def _spawn(self) -> _Repl:
        """Start a process. A command that cannot run is a setup error, raised to the caller."""
        if self._closed:
            raise RuntimeError("this LeanREPLVerifier is closed")
        try:
            repl = _Repl(self.command, self.project_dir, self.env, self.memory_limit_mb)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as err:
            raise type(err)(
                f"cannot start the Lean REPL {self.command!r} in {self.project_dir}: {err}. Install Lean (elan) and "
                "build the project's REPL (see fastdf.prover.check's docstring), or pass command="
            ) from None
        with self._live_lock:
            self._live.add(repl)
        if self._closed:  # closed meanwhile by another thread: leave nothing running
            self._kill(repl)
            raise RuntimeError("this LeanREPLVerifier is closed")
        return repl

    def _handshake(self, repl: _Repl):
        """Check the header in a fresh process (raises _Fault)."""
        repl.ready = True
        if not self.header:
            return
        try:
            response = repl.ask({"cmd": self.header}, self.startup_timeout)
        except _Fault as fault:
            raise _Fault(fault.status, f"while checking the header: {fault.reason}") from None
        if "env" not in response:
            raise _Fault("error", f"the header was refused: {_excerpt(json.dumps(response))}")
        repl.env = response["env"]

    def _check(self, repl: _Repl | None, proof: str) -> tuple[_Repl | None, VerifyResult]:
        start = time.monotonic()

        def failed(status, reason):
            return None, VerifyResult(False, status, [{"severity": "error", "data": reason}],
                                      time.monotonic() - start, reason)

        for attempt in range(2):
            if repl is None:
                repl = self._spawn()
            try:
                if not repl.ready:
                    self._handshake(repl)
                command = {"cmd": proof} if repl.env is None else {"cmd": proof, "env": repl.env}
                response = repl.ask(command, self.timeout)
                break
            except _Fault as fault:
                self._kill(repl)
                repl = None
                if isinstance(fault, _OutOfStep) and attempt == 0:
                    warnings.warn(f"fastdf.prover: {fault.reason}; restarted the REPL and sent the proof again",
                                  RuntimeWarning, stacklevel=2)
                    continue
                return failed(fault.status, fault.reason)
            except Exception as err:  # a bug here must not lose the proof or leave the process running
                self._kill(repl)
                return failed("error", f"fastdf could not check the proof: {type(err).__name__}: {err}")
        ok, status = verdict(response)
        repl.checked += 1
        if self.max_proofs_per_process and repl.checked >= self.max_proofs_per_process:
            self._kill(repl)
            repl = None
        messages = response.get("messages") or ([] if status != "error" else [
            {"severity": "error", "data": response.get("message")}])
        return repl, VerifyResult(ok, status, messages, time.monotonic() - start, _reason(response, status))

    # ---------------------------------------------------------------- public

    def verify(self, proofs: Sequence[str], *, progress: bool = False) -> list[VerifyResult]:
        """Check every proof (full Lean source after the header); results in input order.

        ``proofs`` is a list (or other iterable) of strings; a single string is refused
        (TypeError) rather than checked letter by letter. Calls from several threads run
        one after another. Raises FileNotFoundError/PermissionError when the REPL command
        cannot be started; every other failure becomes that proof's result.
        """
        if isinstance(proofs, (str, bytes)):
            raise TypeError("proofs must be a list of strings, got a single "
                            f"{type(proofs).__name__} (wrap it in a list: verify([proof]))")
        try:
            proofs = list(proofs)
        except TypeError:
            raise TypeError(f"proofs must be a list of strings, got {type(proofs).__name__}") from None
        bad = next((i for i, p in enumerate(proofs) if not isinstance(p, str)), None)
        if bad is not None:
            raise TypeError(f"proofs must be strings; proofs[{bad}] is a {type(proofs[bad]).__name__}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        with self._verify_lock:
            if self._closed:
                raise RuntimeError("this LeanREPLVerifier is closed")
            return self._verify(proofs, progress)

    def _verify(self, proofs, progress):
        from tqdm.auto import tqdm

        results: list[VerifyResult | None] = [None] * len(proofs)
        todo = collections.deque(range(len(proofs)))
        lock = threading.Lock()
        errors: list[BaseException] = []
        bar = tqdm(total=len(proofs), desc="lean check", unit="proof", disable=not progress, leave=False)

        def worker():
            with lock:
                repl = self._idle.pop() if self._idle else None
            try:
                while not errors and not self._closed:
                    with lock:
                        if not todo:
                            return
                        i = todo.popleft()
                    repl, results[i] = self._check(repl, proofs[i])
                    with lock:
                        bar.update(1)
            except BaseException as err:  # a start failure (or a bug): stop the others, raise in verify
                with lock:
                    errors.append(err)
            finally:
                if repl is not None:
                    with lock:
                        self._idle.append(repl)

        # Daemon threads, and every wait inside has a deadline: an interrupted verify never
        # keeps the interpreter from exiting.
        threads = [threading.Thread(target=worker, daemon=True, name=f"fastdf-lean-{w}")
                   for w in range(min(self.workers, len(proofs)))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # KeyboardInterrupt: kill the processes, so the workers end at once
            self.close()
            raise
        finally:
            bar.close()
        if errors:
            raise errors[0]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # closed from another thread mid-verify
            raise RuntimeError(f"this LeanREPLVerifier was closed during verify ({len(missing)} proofs unchecked)")
        return results
