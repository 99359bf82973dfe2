"""ProofSampler: many completions per prompt, each prompt tokenised and prefilled once.

HF ``generate(num_return_sequences=k)`` copies every prompt k times before prefill. Here
the distinct prompts are prefilled once (by the HF model itself), their K/V stay stored
once, and every decode step reads them once for all k samples through
``fastdf.shared_prefix_attention``; the first token of the k samples is drawn from the one
prefill row (``fastdf.sample(..., indices=...)``). Finished samples leave the batch, so
they stop costing compute.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from typing import Sequence

import numpy as np
import torch

from ..ops import _checks
from ..ops.sampling import sample as sample_tokens
from .decoder import DecodeCache, PrefixDecoder, StepGraph

FINISH_REASONS = ("stop", "eos", "length")

_F32 = torch.finfo(torch.float32)
_MAX_POSITIONS = 2**31 - 1  # suffix lengths and positions are int32 in the decode cache and kernels
_U64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """:func:`_mix` on a uint64 array (numpy integer arrays wrap on overflow)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a ``sample(..., seed=seed)`` call (or of theorem
    ``index`` of ``prove(..., seed=seed)``): ``sample(prompts, seed=s)`` equals
    ``sample(prompts, seed=[prompt_seed(s, i) for i in range(len(prompts))])``. Pass such a
    list to sample a subset of the prompts (a shard, the rest of an interrupted run) with
    the draws they get in the whole run."""
    _checks.number("seed", seed, low=-2**63, high=2**64, high_open=True, integer=True)
    _checks.number("index", index, low=0, integer=True)
    return _mix(_mix(int(seed) & _U64) ^ int(index))


def _uniforms(keys: np.ndarray, slots: np.ndarray, step: int) -> torch.Tensor:
    """The uniform of sample ``slots[r]`` of the prompt with seed ``keys[r]`` at decode step
    ``step``: a counter-based hash, so a sample's draws depend on its prompt's seed, its
    slot and the step only, never on which other prompts or samples share the batch or
    when they finish (what makes samples independent of the batch and of the ranks)."""
    h = _mix_array(_mix_array(keys ^ (slots * np.uint64(0xD1B54A32D192ED03))) + np.uint64(step))
    # The top 24 bits: exactly representable in float32, in [0, 1) like torch.rand.
    return torch.from_numpy((h >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24))


@dataclasses.dataclass
class Completion:
    """One sampled continuation.

    text: decoded without special tokens, cut before the first stop string.
    num_tokens: tokens generated, counting the EOS token or the token that completed a
        stop string.
    finish_reason: "stop" (a stop string appeared), "eos" or "length" (max_new_tokens).
    token_ids: the generated token ids (as counted by num_tokens).
    """

    text: str
    num_tokens: int
    finish_reason: str
    token_ids: list[int]


def apply_repetition_penalty(logits, seen, penalty):
    """HF semantics (``RepetitionPenaltyLogitsProcessor``): for tokens already in the
    prompt or the generated text, positive logits are divided by ``penalty`` and negative
    ones multiplied by it. ``seen``: bool ``[B, V]``."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    # An extreme penalty may overflow the dtype: +inf logits would make the draw NaN, so
    # clamp to the largest finite value (finite results are exactly HF's).
    big = torch.finfo(logits.dtype).max
    penalised = penalised.clamp(-big, big)
    return torch.where(seen, penalised, logits)


class ProofSampler:
    """Sample many completions per prompt from an HF causal LM (Llama / Qwen2 / Mistral).

    >>> sampler = ProofSampler(model, tokenizer)
    >>> out = sampler.sample(["theorem foo : 1 + 1 = 2 := by"], num_samples=32,
    ...                      temperature=0.8, top_p=0.95, stop=["```"], seed=0)
    >>> [c.text for c in out[0]]      # 32 completions of the one prompt

    The model's weights are used as they are (no copy); its dtype and device are kept.
    On CUDA the decode step runs as a CUDA graph (``cuda_graphs=False`` to decode eagerly):
    a 1B model's step is otherwise bound by launching ~40 kernels per layer.
    """

    def __init__(self, model, tokenizer=None, *, cuda_graphs: bool = True):
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        self.decoder = PrefixDecoder(model)
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs  # capture the decode step in CUDA graphs (CUDA models only)
        self._keep_finished = False  # tests: the graph-mode batch policy without graphs

    # ------------------------------------------------------------------ public API

    def sample(self, prompts: str | Sequence[str], num_samples: int = 32, max_new_tokens: int = 1024, *,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
               repetition_penalty: float = 1.0, stop: Sequence[str] | None = None,
               seed: int | Sequence[int] | None = None, batch_size: int | None = None, eos_token_id=None,
               progress: bool = True, distributed: bool = False) -> list[list[Completion]]:
        """Sample ``num_samples`` completions for every prompt.

        Args:
            prompts: a string or a list of strings (tokenised with the tokenizer's defaults,
                special tokens included, as ``tokenizer(prompt)`` does).
            num_samples: completions per prompt.
            max_new_tokens: tokens generated at most per completion.
            temperature, top_p, top_k, min_p: as :func:`fastdf.sample` (temperature 0 is
                greedy: token for token what HF ``generate(do_sample=False)`` returns).
            repetition_penalty: HF semantics over prompt + generated tokens (1 = off).
            stop: strings that end a completion (the text is cut before the first one).
            seed: seeds the draws (same seed, same completions on the same backend). Each
                prompt draws from its own stream, seeded by :func:`prompt_seed` ``(seed, i)``
                for prompt ``i``, so its completions do not depend on the other prompts,
                ``batch_size`` or (with ``distributed``) the number of ranks, up to
                floating-point differences between batch shapes. A list gives each prompt's
                seed itself (one int per prompt). None: the global torch RNG.
            batch_size: prompts prefilled and decoded together (default: all).
            eos_token_id: int or list; default the model's generation config, else the
                tokenizer's EOS.
            progress: show a tqdm bar over decode steps.
            distributed: inside an initialised ``torch.distributed`` process group, shard
                the prompts over its ranks (round-robin; each rank samples with its own
                model replica) and return every prompt's completions, in input order, on
                every rank. Every rank must make the same call. Off by default: a training
                loop whose ranks sample their own prompts must not be gathered.

        Returns one list of :class:`Completion` per prompt.
        """
        if self.tokenizer is None:
            raise ValueError("ProofSampler.sample needs a tokenizer: ProofSampler(model, tokenizer)")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a string or a list of strings")
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
        seed = _checks_seeds(seed, len(prompts))
        if distributed:
            from . import _dist

            if _dist.world() is not None:
                rank, size = _dist.world()
                mine = _dist.shard(len(prompts), rank, size)
                if isinstance(seed, int):
                    seed = [prompt_seed(seed, i) for i in range(len(prompts))]
                kw = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, stop=stop,
                          seed=seed, batch_size=batch_size, eos_token_id=eos_token_id)
                shared = (list(prompts), kw)  # what every rank must agree on
                kw = {**kw, "progress": progress, "seed": None if seed is None else [seed[i] for i in mine]}
                parts = _dist.run_and_gather(lambda: (shared, self.sample([prompts[i] for i in mine], **kw)),
                                             "ProofSampler.sample")
                return _dist.merge(parts, len(prompts))
        args = self._check_args(num_samples, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                                generator=None, batch_size=batch_size, eos_token_id=eos_token_id, progress=progress)
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        empty = [i for i, p in enumerate(ids) if len(p) == 0]
        if empty:
            raise ValueError(f"prompts must tokenise to at least one token; prompts[{empty[0]}] is empty")
        results = self._run(self._check_prompts(ids, max_new_tokens), args, seed)
        return [[self._completion(tokens, reason, args["stop"]) for tokens, reason in per_prompt]
                for per_prompt in results]

    def sample_ids(self, prompts: Sequence[Sequence[int]], num_samples: int, max_new_tokens: int, *,
                   temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=None, seed=None,
                   generator=None, batch_size=None, eos_token_id=None, progress=True):
        """Token-level :meth:`sample`: prompts as token id lists (or 1-D integer tensors);
        returns per prompt a list of ``(generated token ids, finish reason)``.

        ``generator``: a ``torch.Generator`` for the draws (instead of ``seed``). Every
        argument is checked before any work starts: a wrong type raises TypeError (a float
        or bool token id, ``stop=123``, ``eos_token_id="x"``), a bad value ValueError (token
        ids outside the model's vocabulary, NaN/inf knobs, a seed outside
        ``[-2**63, 2**64)``). ``seed``: an int or one int per prompt, as in :meth:`sample`."""
        if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
            seed = _checks_seeds(seed, len(prompts))
        args = self._check_args(num_samples, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                                generator=generator, batch_size=batch_size, eos_token_id=eos_token_id,
                                progress=progress)
        return self._run(self._check_prompts(prompts, max_new_tokens), args, seed)

    # ------------------------------------------------------------------ checks

    def _check_args(self, num_samples, max_new_tokens, *, temperature, top_p, top_k, min_p, repetition_penalty,
                    stop, seed, generator, batch_size, eos_token_id, progress) -> dict:
        """Validate every knob (naming the argument); returns them normalised."""
        _checks.number("num_samples", num_samples, low=1, integer=True)
        _checks.number("max_new_tokens", max_new_tokens, low=1, high=_MAX_POSITIONS, integer=True)
        knobs = dict(
            # Beyond float32's range the scaled logits overflow (inf / inf = NaN).
            temperature=_checks.finite_float("temperature", temperature, low=0),
            top_p=_checks.finite_float("top_p", top_p, low=0, high=1, low_open=True),
            top_k=int(_checks.number("top_k", top_k, low=0, integer=True)),
            min_p=_checks.finite_float("min_p", min_p, low=0, high=1),
        )
        # Logits are multiplied and divided by it: it must be a normal float32 number.
        penalty = _checks.finite_float("repetition_penalty", repetition_penalty, low=_F32.tiny)
        if batch_size is not None:
            _checks.number("batch_size", batch_size, low=1, integer=True)
        if seed is not None:
            if not isinstance(seed, list):  # a list was checked by _checks_seeds
                _checks.number("seed", seed, low=-2**63, high=2**64, high_open=True, integer=True)
            if generator is not None:
                raise ValueError("pass seed or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        stop = self._check_stop(stop)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: ProofSampler(model, tokenizer)")
        return dict(num_samples=num_samples, max_new_tokens=max_new_tokens, knobs=knobs, penalty=penalty, stop=stop,
                    seed=seed, generator=generator, batch_size=batch_size, eos=self._eos_ids(eos_token_id),
                    progress=progress)

    def _check_prompts(self, prompts, max_new_tokens) -> list[list[int]]:
        """Token id lists, each id an int in the model's input vocabulary."""
        if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of token id lists, got {type(prompts).__name__}")
        vocab = self.decoder.base.embed_tokens.num_embeddings
        out = []
        for g, prompt in enumerate(prompts):
            if isinstance(prompt, torch.Tensor):
                if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
                    raise TypeError(f"prompts[{g}] must be a 1-D integer tensor or a list of ints, got a "
                                    f"{prompt.dim()}-D {str(prompt.dtype).removeprefix('torch.')} tensor")
                prompt = prompt.tolist()
            elif isinstance(prompt, np.ndarray):
                if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
                    raise TypeError(f"prompts[{g}] must be a 1-D integer array or a list of ints, got a "
                                    f"{prompt.ndim}-D {prompt.dtype} array")
                prompt = prompt.tolist()
            elif isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
                raise TypeError(f"prompts[{g}] must be a list of token ids, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise ValueError(f"prompts[{g}] is empty: every prompt needs at least one token")
            ids = []
            for j, t in enumerate(prompt):
                if isinstance(t, bool) or isinstance(t, float):
                    raise TypeError(f"prompts[{g}][{j}] must be an int token id, got {type(t).__name__} {t!r}")
                try:
                    t = operator.index(t)
                except TypeError:
                    raise TypeError(f"prompts[{g}][{j}] must be an int token id, got {type(t).__name__}") from None
                if not 0 <= t < vocab:
                    raise ValueError(f"prompts[{g}][{j}] = {t} is outside the model's vocabulary [0, {vocab})")
                ids.append(t)
            if len(ids) + max_new_tokens > _MAX_POSITIONS:
                raise ValueError(f"max_new_tokens = {max_new_tokens} plus prompts[{g}]'s {len(ids)} tokens exceeds "
                                 f"{_MAX_POSITIONS} positions")
            out.append(ids)
        return out

    def _run(self, prompts, args, seed):
        if not prompts:
            return []
        keys = None  # per-prompt seeds (counter-based draws), else draws from `generator`
        if isinstance(seed, list):
            keys = [int(s) & _U64 for s in seed]
        elif seed is not None:
            keys = [prompt_seed(seed, i) for i in range(len(prompts))]
        batch_size = args["batch_size"] or len(prompts)
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            out.extend(self._generate(chunk, args["num_samples"], args["max_new_tokens"], args["knobs"],
                                      args["penalty"], args["stop"], args["eos"], args["generator"], args["progress"],
                                      None if keys is None else keys[start:start + batch_size]))
        return out

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_stop(stop):
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if isinstance(stop, bytes) or not isinstance(stop, Sequence):
            raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise TypeError(f"stop must be a list of strings; stop[{i}] is a {type(s).__name__}")
            if not s:
                raise ValueError(f"stop strings must be non-empty; stop[{i}] is ''")
        return list(stop)

    def _eos_ids(self, eos_token_id):
        """The EOS ids: given ones are checked (ints inside the logits' vocabulary); the
        defaults come from the model's generation config, else the tokenizer."""
        if eos_token_id is not None:
            given = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
            vocab = self.decoder.lm_head.weight.shape[0]
            ids = []
            for e in given:
                try:
                    if isinstance(e, (bool, float)):
                        raise TypeError
                    ids.append(operator.index(e))
                except TypeError:
                    raise TypeError(
                        f"eos_token_id must be an int or a list of ints, got {type(e).__name__} {e!r}") from None
                if not 0 <= ids[-1] < vocab:
                    raise ValueError(f"eos_token_id {ids[-1]} is outside the model's vocabulary [0, {vocab})")
            return ids
        config = getattr(self.model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return []
        return [int(e) for e in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)]

    def _completion(self, tokens, reason, stop):
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        return Completion(text=text, num_tokens=len(tokens), finish_reason=reason, token_ids=list(tokens))

    def _has_stop(self, tokens, stop, window):
        """Whether a stop string ends the completion: a cheap look at the last ``window``
        tokens, confirmed on the whole decoded text."""
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        if not any(s in tail for s in stop):
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stop)

    @torch.inference_mode()
    def _generate(self, prompts, num_samples, max_new_tokens, knobs, penalty, stop, eos, generator, progress,
                  seeds=None):
        """The decode loop. Batch rows are the samples placed in the ``[G, N]`` layout, in
        layout order. Eagerly, finished samples leave the batch at once. With CUDA graphs
        (``self.cuda_graphs``), the batch keeps its shape, finished rows computing
        unused tokens, until at most half its rows are alive or a prompt is done; then
        the batch and layout shrink together and the step graph is captured again.
        ``seeds``: per-prompt seeds; the draws are then :func:`_uniforms` of (prompt seed,
        sample slot, step), else ``torch.rand`` from ``generator``."""
        from tqdm.auto import tqdm

        dec = self.decoder
        device = dec.device
        G, N = len(prompts), num_samples
        dec.check_length(max(len(p) for p in prompts) + max_new_tokens)
        graphs = self.cuda_graphs and device.type == "cuda"
        keep = graphs or self._keep_finished
        keys, values, prefix_lens, logits = dec.prefill(prompts)
        cache = DecodeCache(keys, values, prefix_lens, N, max_new_tokens)
        vocab = logits.shape[-1]

        # Cell (g, n) of the layout holds sample sample_of[g, n] (-1: none, or finished).
        sample_of = torch.arange(G * N, device=device).view(G, N)
        group = torch.arange(G, device=device).repeat_interleave(N)  # per batch row
        slot = torch.arange(N, device=device).repeat(G)
        ids = list(range(G * N))  # sample id per batch row
        alive = [True] * (G * N)
        start = prefix_lens.to(torch.int64).repeat_interleave(N)  # position of a row's first new token

        seen = None
        if penalty != 1.0:
            prompt_seen = torch.zeros(G, vocab, dtype=torch.bool, device=device)
            for g, p in enumerate(prompts):
                ids_g = torch.tensor(p, device=device)
                prompt_seen[g, ids_g[ids_g < vocab]] = True  # ids past the lm_head cannot be penalised (as HF)
            logits = apply_repetition_penalty(logits, prompt_seen, penalty)
            seen = prompt_seen.repeat_interleave(N, 0)
        if seeds is not None:
            seeds = np.asarray(seeds, dtype=np.uint64)

        def draw(logits, rows, step, indices=None):
            if seeds is None:
                return sample_tokens(logits, indices=indices, generator=generator, check_nan=False, **knobs)
            sample_ids = np.asarray(rows, dtype=np.int64)  # sample g * N + n
            u = _uniforms(seeds[sample_ids // N], (sample_ids % N).astype(np.uint64), step).to(device)
            return sample_tokens(logits, indices=indices, uniforms=u, check_nan=False, **knobs)

        new_tokens = draw(logits, range(G * N), 0, indices=group.clone())
        tokens = new_tokens

        generated = [[] for _ in range(G * N)]
        reasons = [None] * (G * N)
        eos_t = torch.tensor(eos or [-2], dtype=torch.int64, device=device)  # -2: no token is EOS
        window = max((len(s) for s in stop), default=0) + 16
        step_fn = None
        bar = tqdm(total=max_new_tokens, desc="fastdf.prover decode", unit="tok", disable=not progress, leave=False)
        for step in range(max_new_tokens):
            # Bookkeeping of the tokens just drawn (alive rows only, in batch order).
            rows = [r for r in range(len(ids)) if alive[r]]
            # One device-to-host transfer per step: the tokens and their EOS flags.
            host = torch.stack([new_tokens, torch.isin(new_tokens, eos_t).to(new_tokens.dtype)]).tolist()
            if -1 in host[0]:
                raise ValueError("the model produced NaN or +inf logits (or a row with no finite logit)")
            finished = []
            for r, tok, is_eos in zip(rows, host[0], host[1]):
                i = ids[r]
                generated[i].append(tok)
                if is_eos:
                    reasons[i] = "eos"
                elif stop and self._has_stop(generated[i], stop, window):
                    reasons[i] = "stop"
                elif step + 1 == max_new_tokens:
                    reasons[i] = "length"
                else:
                    continue
                finished.append(r)
            bar.update(1)
            if seen is not None:
                seen[torch.tensor(rows, device=device), new_tokens] = True
            if len(finished) == len(rows):
                break
            if finished:
                for r in finished:
                    alive[r] = False
                dead = torch.tensor(finished, device=device)
                sample_of[group[dead], slot[dead]] = -1
                cache.suffix_lens[group[dead], slot[dead]] = 0
                compacted = self._maybe_compact(cache, sample_of)
                if not keep or compacted is not None:
                    live = torch.tensor([r for r in range(len(ids)) if alive[r]], device=device)
                    tokens, start, group, slot = (x[live] for x in (tokens, start, group, slot))
                    ids = [i for i, a in zip(ids, alive) if a]
                    alive = [True] * len(ids)
                    if seen is not None:
                        seen = seen[live]
                if compacted is not None:
                    sample_of, group, slot = compacted
                    step_fn = None
            bar.set_postfix(active=len(rows) - len(finished))
            cache.suffix_lens[group, slot] = step + 1
            t = torch.tensor(step, device=device)
            if graphs and step_fn is None:
                step_fn = self._graph(cache, tokens, start + step, group, slot, t)
                graphs = step_fn is not None
            if graphs:
                logits = step_fn(tokens, start + step, t)
            else:
                logits = dec.step(tokens, start + step, group, slot, cache, t)
            if not all(alive):
                live = torch.tensor([r for r in range(len(ids)) if alive[r]], device=device)
                logits = logits[live]
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen if all(alive) else seen[live], penalty)
            new_tokens = draw(logits, [i for i, a in zip(ids, alive) if a], step + 1)
            tokens = new_tokens if all(alive) else tokens.index_put((live,), new_tokens)
        bar.close()
        return [[(generated[g * N + n], reasons[g * N + n]) for n in range(N)] for g in range(G)]

    def _graph(self, cache, tokens, positions, group, slot, t):
        """The decode step for this layout as a CUDA graph, or None (with a warning) if
        capture fails: the eager step computes the same."""
        try:
            return StepGraph(self.decoder, cache, tokens, positions, group, slot, t)
        except Exception as err:
            warnings.warn(f"fastdf.prover: CUDA graph capture failed ({type(err).__name__}: {err}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
            self.cuda_graphs = False
            return None

    @staticmethod
    def _maybe_compact(cache, sample_of):
        """Shrink the layout once at most half its cells hold live samples or a prompt is
        done: prompts without live samples leave, each prompt keeps only live slots.
        Returns the new (sample_of, group, slot) of the live samples, or None."""
        live = sample_of >= 0
        per_group = live.sum(1)
        cells = sample_of.numel()
        if int(per_group.min()) > 0 and 2 * int(live.sum()) > cells:
            return None
        groups = (per_group > 0).nonzero()[:, 0]
        width = int(per_group.max())
        # For each kept prompt: its live slots first (in slot order), padded with empty ones.
        order = torch.sort((~live[groups]).to(torch.int8), dim=1, stable=True).indices[:, :width]
        cache.compact(groups, order)
        new_sample_of = sample_of[groups[:, None], order]
        new_sample_of = torch.where(torch.arange(width, device=order.device)[None, :] < per_group[groups, None],
                                    new_sample_of, torch.full_like(new_sample_of, -1))
        cache.suffix_lens = torch.where(new_sample_of >= 0, cache.suffix_lens, torch.zeros_like(cache.suffix_lens))
        # Active samples in layout order (the decode step's dense path relies on it).
        g_idx, n_idx = (new_sample_of >= 0).nonzero(as_tuple=True)
        return new_sample_of, g_idx, n_idx



def _checks_seeds(seed, num_prompts):
    """``seed``: None, an int, or a list of ints with one per prompt (returned as a list)."""
    if seed is None or isinstance(seed, bool) or not isinstance(seed, Sequence) or isinstance(seed, (str, bytes)):
        return seed  # None or a single int: checked with the other knobs
    seed = list(seed)
    if len(seed) != num_prompts:
        raise ValueError(f"seed must be an int or one int per prompt: got {len(seed)} seeds for {num_prompts} prompts")
    for i, s in enumerate(seed):
        _checks.number(f"seed[{i}]", s, low=-2**63, high=2**64, high_open=True, integer=True)
    return [operator.index(s) for s in seed]
