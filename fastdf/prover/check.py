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
its stdout, holding ``messages`` (``severity``: info/warning/error) and ``sorries``. A proof
passes when no message has severity "error", nothing is reported in ``sorries`` and no
message says the declaration uses ``sorry``.

Limits: ``timeout`` seconds per proof (the process group is killed and restarted, the
proof reported as "timeout"); ``memory_limit_mb`` sets ``RLIMIT_AS`` (virtual memory) on
the process and its children. Importing Mathlib maps several GB of ``.olean`` files, so
give it generous room (32 GB is a safe start) or leave it None.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import queue
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence, runtime_checkable

DEFAULT_HEADER = "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\n\nopen BigOperators Real Nat Topology Rat"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator: ``1 - C(n-c, k) / C(n, k)`` for ``n`` samples of which
    ``c`` are correct, as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (stable for n in
    the thousands, where the binomials overflow floats)."""
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

    status: "pass", "fail" (Lean errors or sorry), "timeout", "crash" (the checker died,
        e.g. out of memory) or "error" (the REPL refused the command).
    messages: the REPL's messages (dicts with severity, pos, data), or one describing
        the timeout/crash.
    """

    ok: bool
    status: str
    messages: list = dataclasses.field(default_factory=list)
    time_s: float = 0.0


@runtime_checkable
class Verifier(Protocol):
    """Anything that checks proofs: ``verify(proofs) -> [VerifyResult]`` in input order."""

    def verify(self, proofs: Sequence[str]) -> list[VerifyResult]: ...


def verdict(response: dict) -> tuple[bool, str]:
    """(ok, status) of one REPL response."""
    if "messages" not in response and "message" in response:
        return False, "error"
    errors = [m for m in response.get("messages", []) if m.get("severity") == "error"]
    sorry = bool(response.get("sorries")) or any(
        "declaration uses 'sorry'" in str(m.get("data", "")) for m in response.get("messages", [])
    )
    ok = not errors and not sorry
    return ok, "pass" if ok else "fail"


class _Dead(Exception):
    """The REPL process ended or timed out."""


class _Repl:
    """One REPL process: JSON commands in, JSON responses out, read by a thread so every
    wait has a deadline."""

    def __init__(self, command, cwd, env, memory_limit_mb):
        def limits():
            if memory_limit_mb:
                import resource

                limit = int(memory_limit_mb) * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        self.proc = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
            preexec_fn=limits if memory_limit_mb else None,
        )
        self.responses: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.env = None
        self.checked = 0

    def _read(self):
        lines = []
        try:
            for line in self.proc.stdout:
                if line.strip():
                    lines.append(line)
                elif lines:
                    self.responses.put("".join(lines))
                    lines = []
        except (OSError, ValueError):
            pass
        if lines:
            self.responses.put("".join(lines))
        self.responses.put(None)  # end of stream

    def _read_stderr(self):
        try:
            for line in self.proc.stderr:
                self.stderr = (self.stderr + [line])[-20:]
        except (OSError, ValueError):
            pass

    def ask(self, command: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(command) + "\n\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as err:
            raise _Dead("crash", f"the REPL closed its input ({err})") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise _Dead("timeout", f"no answer within {timeout:g}s") from None
            if text is None:
                code = self.proc.wait(timeout=5)
                tail = "".join(self.stderr).strip()[-500:]
                raise _Dead("crash", f"the REPL exited with code {code}" + (f": {tail}" if tail else ""))
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                continue  # not a response (a stray log line): keep waiting

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # lake runs the repl as a child: kill both
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


class LeanREPLVerifier:
    """A pool of Lean REPL processes checking proofs in parallel (see the module docstring
    for how to point it at a Lean + Mathlib project).

    Args:
        project_dir: the Lean project the REPL runs in (its working directory).
        command: the REPL command line (default ``lake exe repl``).
        header: sent once per process (imports, options); proofs run in its environment.
            None or "" sends each proof on its own.
        workers: processes in the pool (default: half the CPUs, at least 1).
        timeout: seconds per proof before its process is killed and restarted.
        startup_timeout: seconds for a process to start and check the header.
        memory_limit_mb: ``RLIMIT_AS`` for each process and its children (None: no limit).
        max_proofs_per_process: restart a process after this many proofs (bounds the
            memory the REPL's growing environment table takes; None: never).
        env: environment variables for the processes (default: inherited).

    ``verify(proofs)`` returns one :class:`VerifyResult` per proof, in order; a proof that
    hangs or crashes its process is reported as such and the process restarted, so no
    result is lost and nothing waits past its timeout. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, project_dir, *, command=("lake", "exe", "repl"), header: str | None = DEFAULT_HEADER,
                 workers: int | None = None, timeout: float = 60.0, startup_timeout: float = 600.0,
                 memory_limit_mb: int | None = None, max_proofs_per_process: int | None = None, env=None):
        if not os.path.isdir(project_dir):
            raise ValueError(f"project_dir {project_dir!r} is not a directory")
        if timeout <= 0 or startup_timeout <= 0:
            raise ValueError("timeout and startup_timeout must be > 0")
        self.project_dir = str(project_dir)
        self.command = list(command)
        self.header = header or None
        self.workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        self.memory_limit_mb = memory_limit_mb
        self.max_proofs_per_process = max_proofs_per_process
        self.env = env
        self._idle: queue.Queue = queue.Queue()
        for _ in range(self.workers):
            self._idle.put(None)  # a slot; its process starts on first use
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop every REPL process."""
        self._closed = True
        while True:
            try:
                repl = self._idle.get_nowait()
            except queue.Empty:
                break
            if repl is not None:
                repl.kill()

    def _start(self) -> _Repl:
        try:
            repl = _Repl(self.command, self.project_dir, self.env, self.memory_limit_mb)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"cannot start the Lean REPL {self.command!r} in {self.project_dir}: {err}. Install Lean (elan) and "
                "build the project's REPL (see fastdf.prover.check's docstring), or pass command="
            ) from None
        if self.header:
            try:
                response = repl.ask({"cmd": self.header}, self.startup_timeout)
            except _Dead:
                repl.kill()
                raise
            if "env" not in response:
                repl.kill()
                raise _Dead("error", f"the header was refused: {response}")
            repl.env = response["env"]
        return repl

    def _check(self, repl: _Repl | None, proof: str) -> tuple[_Repl | None, VerifyResult]:
        start = time.monotonic()
        try:
            if repl is None:
                repl = self._start()
            command = {"cmd": proof} if repl.env is None else {"cmd": proof, "env": repl.env}
            response = repl.ask(command, self.timeout)
        except _Dead as dead:
            status, message = dead.args
            if repl is not None:
                repl.kill()
            return None, VerifyResult(False, status, [{"severity": "error", "data": message}],
                                      time.monotonic() - start)
        ok, status = verdict(response)
        repl.checked += 1
        if self.max_proofs_per_process and repl.checked >= self.max_proofs_per_process:
            repl.kill()
            repl = None
        return repl, VerifyResult(ok, status, response.get("messages", [response.get("message")]),
                                  time.monotonic() - start)

    def verify(self, proofs: Sequence[str], *, progress: bool = False) -> list[VerifyResult]:
        """Check every proof (full Lean source after the header); results in input order."""
        if self._closed:
            raise RuntimeError("this LeanREPLVerifier is closed")
        proofs = list(proofs)
        if not all(isinstance(p, str) for p in proofs):
            raise TypeError("proofs must be strings")
        results: list[VerifyResult | None] = [None] * len(proofs)
        todo: queue.Queue = queue.Queue()
        for i in range(len(proofs)):
            todo.put(i)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(proofs), desc="lean check", unit="proof", disable=not progress, leave=False)
        lock = threading.Lock()

        def worker():
            repl = self._idle.get()
            try:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    repl, results[i] = self._check(repl, proofs[i])
                    with lock:
                        bar.update(1)
            finally:
                self._idle.put(repl)

        with ThreadPoolExecutor(self.workers) as pool:
            for f in [pool.submit(worker) for _ in range(min(self.workers, max(1, len(proofs))))]:
                f.result()
        bar.close()
        return results
