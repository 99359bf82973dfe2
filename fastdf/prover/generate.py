"""``model.generate(..., custom_generate=fastdf.prover.generate)``: HF generate's front end
(generation config, stopping criteria, returned tensor) with ProofSampler's decode loop.

transformers 5 passes a callable ``custom_generate`` the prepared ``input_ids`` (already
repeated ``num_return_sequences`` times), the logits processors and stopping criteria it
built from the generation config, and the config itself. The repeated prompts are
de-duplicated here, so each distinct prompt is prefilled once and its K/V read once per
step for all of its sequences. The knobs are read from the generation config; processors
or criteria this loop does not implement are refused by name rather than ignored.
"""

from __future__ import annotations

import torch

from .sampler import ProofSampler

SUPPORTED_PROCESSORS = frozenset({
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
    "RepetitionPenaltyLogitsProcessor",
})
SUPPORTED_CRITERIA = frozenset({"MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria"})


def _as_list(ids):
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.flatten().tolist()]
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus=False, streamer=None, tokenizer=None, progress=False, **model_kwargs):
    """A ``custom_generate`` for HF ``generate`` (Llama / Qwen2 / Mistral models).

    Usage::

        out = model.generate(input_ids, custom_generate=fastdf.prover.generate, do_sample=True,
                             num_return_sequences=64, temperature=0.8, top_p=0.95, max_new_tokens=512)

    Returns the same ``[B * num_return_sequences, prompt + new]`` tensor as HF (finished
    sequences padded with the pad token; a ``GenerateDecoderOnlyOutput`` with only
    ``sequences`` under ``return_dict_in_generate``). Supported: sampling or greedy,
    temperature, top_k, top_p, min_p, repetition_penalty, EOS, max_new_tokens/max_length.
    Seeded by the global torch RNG, as HF sampling is. Beam search, streamers,
    scores/logits outputs and other processors raise ``NotImplementedError``.

    Stop strings: transformers 5.24 drops the ``tokenizer`` kwarg before building its
    stop-string criterion when ``custom_generate`` is a callable, so ``generate`` itself
    raises for ``stop_strings`` before reaching this function; use
    ``ProofSampler.sample(..., stop=[...])``, which also cuts the text at the stop string.
    """
    config = generation_config if generation_config is not None else model.generation_config
    if streamer is not None:
        raise NotImplementedError("fastdf.prover.generate does not stream (streamer must be None)")
    if synced_gpus:
        raise NotImplementedError("fastdf.prover.generate does not run under synced_gpus")
    for proc in logits_processor or []:
        if type(proc).__name__ not in SUPPORTED_PROCESSORS:
            raise NotImplementedError(f"fastdf.prover.generate does not implement {type(proc).__name__}")
    for crit in stopping_criteria or []:
        if type(crit).__name__ not in SUPPORTED_CRITERIA:
            raise NotImplementedError(f"fastdf.prover.generate does not implement {type(crit).__name__}")
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(config, flag, False):
            raise NotImplementedError(f"fastdf.prover.generate does not return {flag.removeprefix('output_')}")
    if (getattr(config, "num_beams", 1) or 1) > 1:
        raise NotImplementedError("fastdf.prover.generate does not do beam search")

    k = getattr(config, "num_return_sequences", 1) or 1
    rows, length = input_ids.shape
    mask = model_kwargs.get("attention_mask")
    prompts = []
    for r in range(0, rows, k):
        row = input_ids[r]
        if mask is not None:
            row = row[mask[r].bool()]
        prompts.append(row.tolist())
    max_new = config.max_length - length
    if max_new < 1:
        return input_ids
    do_sample = bool(config.do_sample)
    stop = list(getattr(config, "stop_strings", None) or [])
    if isinstance(getattr(config, "stop_strings", None), str):
        stop = [config.stop_strings]
    if stop and tokenizer is None:
        raise ValueError("stop_strings need tokenizer= (as HF generate does)")
    eos = _as_list(getattr(config, "_eos_token_tensor", None)) or _as_list(config.eos_token_id)
    sampler = ProofSampler(model, tokenizer)
    results = sampler.sample_ids(
        prompts, k, max_new,
        temperature=float(config.temperature if config.temperature is not None else 1.0) if do_sample else 0.0,
        top_k=int(config.top_k or 0) if do_sample else 0,
        top_p=float(config.top_p if config.top_p is not None else 1.0) if do_sample else 1.0,
        min_p=float(config.min_p or 0.0) if do_sample else 0.0,
        repetition_penalty=float(config.repetition_penalty or 1.0),
        stop=stop, eos_token_id=eos, progress=progress,
    )
    pad = _as_list(getattr(config, "_pad_token_tensor", None)) or _as_list(config.pad_token_id) or eos or [0]
    longest = max(len(tokens) for per_prompt in results for tokens, _ in per_prompt)
    out = torch.full((rows, length + longest), pad[0], dtype=input_ids.dtype, device=input_ids.device)
    out[:, :length] = input_ids
    for g, per_prompt in enumerate(results):
        for n, (tokens, _) in enumerate(per_prompt):
            out[g * k + n, length:length + len(tokens)] = torch.tensor(tokens, dtype=out.dtype)
    if getattr(config, "return_dict_in_generate", False):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=out)
    return out
