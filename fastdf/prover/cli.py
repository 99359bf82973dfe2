"""``python -m fastdf.prover``: sample and check proofs for a JSONL file of theorems,
sharded over the ranks of ``torchrun`` (or one process), resumable.

Input (``--theorems``): one JSON object per line (blank lines skipped) with
``"theorem"`` (required: the Lean statement the model continues, e.g.
``"theorem foo : 1 + 1 = 2 := by"``) and ``"id"`` (optional: any JSON value, echoed;
default the theorem's index). ``index`` below is the 0-based position among the
non-blank lines.

Output (``--output``): one JSON object per theorem, appended as theorems finish, in input
order, each line flushed and fsynced (written by rank 0)::

    {"index": 0, "id": ..., "theorem": "...", "k": 8, "num_correct": 2,
     "pass_at": {"1": 0.25, "8": 1.0},
     "samples": [{"text": "...", "proof": "...", "num_tokens": 31, "finish_reason": "stop",
                  "ok": true, "status": "pass", "reason": "", "messages": [...]}, ...]}

Rerun with the same arguments to resume: theorems already in the output are skipped, a
truncated last line (a crash mid-write) is dropped and redone. Theorems are processed
``--chunk-size`` at a time over all ranks, so a crash loses at most one chunk. With
``--seed`` (default 0) theorem ``index`` samples from its own stream, so the output does
not depend on the number of ranks, the chunk size or where a run was resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdf.prover", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--theorems", required=True, help="JSONL file, one {\"theorem\": ..., \"id\": ...} per line")
    p.add_argument("--output", required=True, help="JSONL results, appended; an existing file is resumed")
    p.add_argument("--model", required=True, help="local directory of an HF causal LM (never downloaded)")
    p.add_argument("--tokenizer", help="local tokenizer directory (default: --model)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--k", type=int, default=32, help="samples per theorem")
    p.add_argument("--ks", default=None, help="comma-separated j of pass@j (default 1,k)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-prefix", help="file whose text is prepended to every theorem (few-shot examples)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="theorems per round over all ranks (default 8 per rank); a crash loses at most one")
    p.add_argument("--batch-size", type=int, default=None, help="prompts sampled together per rank (default all)")
    p.add_argument("--project-dir", default=".", help="the Lean project the REPL runs in")
    p.add_argument("--repl-command", default="lake exe repl", help="the REPL command line (shell-quoted)")
    p.add_argument("--header", default=None, help="sent once per REPL process (default: fastdf's Mathlib header)")
    p.add_argument("--workers", type=int, default=None, help="REPL processes per rank")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per proof")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(p: argparse.ArgumentParser, a) -> None:
    """Everything checkable without the model: bad paths and values end the run here."""
    for name in ("theorems",):
        if not os.path.isfile(getattr(a, name)):
            p.error(f"--{name} {getattr(a, name)!r} is not a file")
    if a.prompt_prefix is not None and not os.path.isfile(a.prompt_prefix):
        p.error(f"--prompt-prefix {a.prompt_prefix!r} is not a file")
    for name in ("model", "tokenizer", "project_dir"):
        path = getattr(a, name)
        if path is not None and not os.path.isdir(path):
            p.error(f"--{name.replace('_', '-')} {path!r} is not a directory")
    if os.path.isdir(a.output):
        p.error(f"--output {a.output!r} is a directory")
    parent = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(parent):
        p.error(f"--output's directory {parent!r} does not exist")
    for name, low in (("k", 1), ("max_new_tokens", 1), ("top_k", 0)):
        if getattr(a, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(a, name)}")
    for name in ("chunk_size", "batch_size", "workers"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.timeout > 0:
        p.error(f"--timeout must be > 0, got {a.timeout}")
    if a.ks is not None:
        try:
            a.ks = sorted({int(j) for j in a.ks.split(",")})
        except ValueError:
            p.error(f"--ks must be comma-separated integers, got {a.ks!r}")
        if any(not 1 <= j <= a.k for j in a.ks):
            p.error(f"every j in --ks must be in [1, k={a.k}], got {a.ks}")
    else:
        a.ks = sorted({1, a.k})
    try:
        a.repl_command = shlex.split(a.repl_command)
    except ValueError as err:
        p.error(f"--repl-command cannot be parsed: {err}")
    if not a.repl_command:
        p.error("--repl-command is empty")
    if shutil.which(a.repl_command[0], path=os.environ.get("PATH")) is None and not os.path.isfile(
            os.path.join(a.project_dir, a.repl_command[0])):
        p.error(f"--repl-command: {a.repl_command[0]!r} is not an executable on PATH")


def read_theorems(path: str) -> list[dict]:
    """The theorems file's objects (``index``, ``id``, ``theorem``); ValueError names the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("theorem"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string \"theorem\"")
            out.append({"index": len(out), "id": obj.get("id", len(out)), "theorem": obj["theorem"]})
    return out


def read_done(path: str, theorems: list[dict], k: int) -> set[int]:
    """Indices already in the output. A last line cut short by a crash (no newline, or not
    JSON) is truncated away; anything else that does not match the run raises ValueError."""
    if not os.path.exists(path):
        return set()
    done = set()
    with open(path, "rb+") as f:
        data = f.read()
        lines = data.split(b"\n")
        good = 0  # bytes of complete, valid lines
        for n, raw in enumerate(lines):
            last = n == len(lines) - 1  # after the final newline: b"" or a partial line
            if not raw.strip():
                good += len(raw) + (not last)
                continue
            try:
                obj = json.loads(raw)
                ok = isinstance(obj, dict) and isinstance(obj.get("index"), int)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if last or (not ok and n == len(lines) - 2 and not lines[-1]):
                break  # the partial tail of a crashed write: dropped and redone
            if not ok:
                raise ValueError(f"{path}:{n + 1}: not a result line (the file is corrupt, not just cut short)")
            i = obj["index"]
            if not 0 <= i < len(theorems) or obj.get("theorem") != theorems[i]["theorem"]:
                raise ValueError(f"{path}:{n + 1}: theorem {i} does not match --theorems (another run's output?)")
            if obj.get("k") != k:
                raise ValueError(f"{path}:{n + 1}: written with k={obj.get('k')}, this run has --k {k}")
            done.add(i)
            good += len(raw) + 1
        if good < len(data):
            f.truncate(good)
    return done


def _line(t: dict, k: int, result) -> str:
    samples = [dict(text=c.text, proof=p, num_tokens=c.num_tokens, finish_reason=c.finish_reason, ok=r.ok,
                    status=r.status, reason=r.reason, messages=r.messages)
               for c, p, r in zip(result.completions, result.proofs, result.results)]
    return json.dumps(dict(index=t["index"], id=t["id"], theorem=t["theorem"], k=k, num_correct=result.num_correct,
                           pass_at={str(j): v for j, v in result.pass_at.items()}, samples=samples),
                      ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    """Run the CLI (``argv`` defaults to ``sys.argv[1:]``); returns the exit status.

    Uses the default process group when one is initialised (else initialises one from
    torchrun's environment when ``WORLD_SIZE`` > 1)."""
    import torch
    import torch.distributed as dist

    from . import _dist
    from .check import DEFAULT_HEADER, LeanREPLVerifier
    from .prove import prove
    from .sampler import ProofSampler, prompt_seed

    p = _parser()
    a = p.parse_args(argv)
    _check_args(p, a)
    try:
        theorems = read_theorems(a.theorems)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        p.error(f"--theorems: {err}")
    prefix = ""
    if a.prompt_prefix is not None:
        with open(a.prompt_prefix, encoding="utf-8") as f:
            prefix = f.read()

    own_group = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        own_group = True
    try:
        ranks = _dist.world()
        rank, size = ranks or (0, 1)
        # Rank 0 reads (and repairs) the output; every rank learns the same done set, or
        # every rank raises rank 0's error.
        if ranks is None:
            try:
                done = read_done(a.output, theorems, a.k)
            except ValueError as err:
                p.error(f"--output: {err}")
        else:
            parts = _dist.run_and_gather(lambda: ((theorems, vars(a)), read_done(a.output, theorems, a.k)
                                                  if rank == 0 else None), "reading --output")
            done = parts[0]
        todo = [t for t in theorems if t["index"] not in done]

        if a.device is None:
            a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        if a.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(a.device))
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or a.model, local_files_only=True)
        dtype = "auto" if a.dtype == "auto" else getattr(torch, a.dtype)
        model = AutoModelForCausalLM.from_pretrained(a.model, local_files_only=True, dtype=dtype)
        model = model.to(a.device).eval()
        sampler = ProofSampler(model, tokenizer)

        from tqdm.auto import tqdm

        chunk = a.chunk_size or 8 * size
        bar = tqdm(total=len(theorems), initial=len(theorems) - len(todo), desc="fastdf.prover", unit="theorem",
                   disable=a.no_progress or rank != 0)
        kw = dict(ks=a.ks, prompt=lambda t: prefix + t, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                  top_p=a.top_p, top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty, stop=a.stop,
                  batch_size=a.batch_size, progress=False)
        header = DEFAULT_HEADER if a.header is None else a.header
        with LeanREPLVerifier(a.project_dir, command=a.repl_command, header=header, workers=a.workers,
                              timeout=a.timeout) as verifier, \
                open(a.output, "a", encoding="utf-8") if rank == 0 else _Null() as out:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                report = prove(sampler, verifier, [t["theorem"] for t in part], a.k,
                               seed=[prompt_seed(a.seed, t["index"]) for t in part], **kw)
                if rank == 0:
                    for t, result in zip(part, report.theorems):
                        out.write(_line(t, a.k, result))
                        out.flush()
                        os.fsync(out.fileno())  # on disk before the next theorem: a crash keeps it
                bar.update(len(part))
        bar.close()
        if rank == 0:
            print(summary(a.output, a.ks), flush=True)
    finally:
        if own_group:
            dist.destroy_process_group()
    return 0


def summary(path: str, ks) -> str:
    """pass@j averaged over every theorem in the output file."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    means = {j: sum(r["pass_at"][str(j)] for r in rows) / max(1, len(rows)) for j in ks}
    return f"{len(rows)} theorems; " + ", ".join(f"pass@{j} = {v:.3f}" for j, v in means.items())


class _Null:
    """Stands in for the output file on ranks other than 0."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
