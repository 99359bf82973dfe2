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
import warnings
from typing import Sequence

import torch

from ..ops import _checks
from ..ops.sampling import sample as sample_tokens
from .decoder import DecodeCache, PrefixDecoder, StepGraph

FINISH_REASONS = ("stop", "eos", "length")


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
        self.decoder = PrefixDecoder(model)
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs  # capture the decode step in CUDA graphs (CUDA models only)
        self._keep_finished = False  # tests: the graph-mode batch policy without graphs

    # ------------------------------------------------------------------ public API

    def sample(self, prompts: str | Sequence[str], num_samples: int = 32, max_new_tokens: int = 1024, *,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
               repetition_penalty: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
               batch_size: int | None = None, eos_token_id=None, progress: bool = True) -> list[list[Completion]]:
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
            seed: seeds the draws (same seed, same completions on the same backend).
            batch_size: prompts prefilled and decoded together (default: all).
            eos_token_id: int or list; default the model's generation config, else the
                tokenizer's EOS.
            progress: show a tqdm bar over decode steps.

        Returns one list of :class:`Completion` per prompt.
        """
        if self.tokenizer is None:
            raise ValueError("ProofSampler.sample needs a tokenizer: ProofSampler(model, tokenizer)")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a string or a list of strings")
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        if any(len(p) == 0 for p in ids):
            raise ValueError("prompts must tokenise to at least one token")
        stop = self._check_stop(stop)
        results = self.sample_ids(ids, num_samples, max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, stop=stop,
                                  seed=seed, batch_size=batch_size, eos_token_id=eos_token_id, progress=progress)
        return [[self._completion(tokens, reason, stop) for tokens, reason in per_prompt] for per_prompt in results]

    def sample_ids(self, prompts: Sequence[Sequence[int]], num_samples: int, max_new_tokens: int, *,
                   temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=None, seed=None,
                   generator=None, batch_size=None, eos_token_id=None, progress=True):
        """Token-level :meth:`sample`: prompts as token id lists; returns per prompt a list
        of ``(generated token ids, finish reason)``."""
        _checks.number("num_samples", num_samples, low=1, integer=True)
        _checks.number("max_new_tokens", max_new_tokens, low=1, integer=True)
        _checks.number("temperature", temperature, low=0)
        _checks.number("top_p", top_p, low=0, high=1, low_open=True)
        _checks.number("top_k", top_k, low=0, integer=True)
        _checks.number("min_p", min_p, low=0, high=1)
        _checks.number("repetition_penalty", repetition_penalty, low=0, low_open=True)
        if batch_size is not None:
            _checks.number("batch_size", batch_size, low=1, integer=True)
        if seed is not None:
            _checks.number("seed", seed, integer=True)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: ProofSampler(model, tokenizer)")
        prompts = [list(map(int, p)) for p in prompts]
        eos = self._eos_ids(eos_token_id)
        if generator is None and seed is not None:
            generator = torch.Generator(self.decoder.device).manual_seed(seed)
        knobs = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), min_p=float(min_p))
        batch_size = batch_size or max(1, len(prompts))
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            out.extend(self._generate(chunk, num_samples, max_new_tokens, knobs, float(repetition_penalty),
                                      stop or [], eos, generator, progress))
        return out

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_stop(stop):
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a list of non-empty strings")
        return list(stop)

    def _eos_ids(self, eos_token_id):
        if eos_token_id is None:
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
    def _generate(self, prompts, num_samples, max_new_tokens, knobs, penalty, stop, eos, generator, progress):
        """The decode loop. Batch rows are the samples placed in the ``[G, N]`` layout, in
        layout order. Eagerly, finished samples leave the batch at once. With CUDA graphs
        (``self.cuda_graphs``), the batch keeps its shape, finished rows computing
        unused tokens, until at most half its rows are alive or a prompt is done; then
        the batch and layout shrink together and the step graph is captured again."""
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
        new_tokens = sample_tokens(logits, indices=group.clone(), generator=generator, check_nan=False, **knobs)
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
            new_tokens = sample_tokens(logits, generator=generator, check_nan=False, **knobs)
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

