"""ProofSampler and fastdf.prover.generate against HF transformers on tiny random models."""

import numpy as np
import pytest
import torch

import fastdf
from fastdf.prover import ProofSampler, apply_repetition_penalty, prompt_seed
from fastdf.prover import sampler as sampler_module

PROMPTS = ["theorem add_comm' (a b : Nat) :", "lemma two : 1 + 1 = 2 := by", "  omega"]


def hf_greedy(model, tokenizer, prompt, max_new_tokens, **kw):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, **kw)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_equals_hf_generate(model, tokenizer):
    """Three prompts of different lengths prefilled together, 2 samples each, 14 tokens."""
    out = ProofSampler(model, tokenizer).sample(PROMPTS, num_samples=2, max_new_tokens=14, temperature=0.0,
                                                progress=False)
    assert len(out) == 3 and all(len(per) == 2 for per in out)
    for prompt, per in zip(PROMPTS, out):
        want = hf_greedy(model, tokenizer, prompt, 14)
        for c in per:
            assert c.token_ids == want[: len(c.token_ids)]
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.num_tokens == len(c.token_ids)
        assert per[0].finish_reason == ("eos" if want[-1] == 2 and len(want) < 14 else "length")


@pytest.mark.parametrize("keep_finished", [False, True])
def test_eos_and_early_prompts_leave_the_batch(model_factory, tokenizer, keep_finished):
    """EOS chosen from prompt 0's greedy output: prompt 0 stops early (its prompt leaves the
    layout), the others still match HF token for token."""
    model = model_factory("llama")
    first = hf_greedy(model, tokenizer, PROMPTS[0], 12)
    eos = first[3]
    sampler = ProofSampler(model, tokenizer)
    sampler._keep_finished = keep_finished
    out = sampler.sample(PROMPTS, num_samples=2, max_new_tokens=12, temperature=0.0, eos_token_id=eos, progress=False)
    for prompt, per in zip(PROMPTS, out):
        want = hf_greedy(model, tokenizer, prompt, 12, eos_token_id=eos)
        assert per[0].token_ids == want and per[1].token_ids == want
        assert per[0].finish_reason == ("eos" if want[-1] == eos else "length")
    assert out[0][0].finish_reason == "eos" and out[0][0].num_tokens <= 4


@pytest.mark.parametrize("keep_finished", [False, True])
def test_decode_steps_match_hf_forward_through_compaction(model_factory, tokenizer, monkeypatch, keep_finished):
    """Scripted tokens (samples finish at different steps, so the layout shrinks twice:
    once by slots, once by a whole prompt): the logits handed to the sampler at every step
    equal HF's full forward over prompt + tokens so far. keep_finished: the CUDA-graph
    batch policy (finished rows stay in the batch until compaction)."""
    model = model_factory("qwen2")
    eos = 2
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    g = torch.Generator().manual_seed(0)
    script = torch.randint(4, len(tokenizer), (6, 6), generator=g).tolist()  # sample -> tokens per step
    for sample, step in [(3, 1), (0, 2), (5, 3), (4, 4)]:
        script[sample][step] = eos
    seen, finished = [], set()

    def scripted(logits, indices=None, generator=None, **knobs):
        step = len(seen)
        active = [i for i in range(6) if i not in finished] if indices is None else list(range(6))
        rows = logits[indices] if indices is not None else logits
        seen.append({i: rows[b].clone() for b, i in enumerate(active)})
        tokens = [script[i][step] for i in active]
        finished.update(i for i, t in zip(active, tokens) if t == eos)
        return torch.tensor(tokens)

    monkeypatch.setattr(sampler_module, "sample_tokens", scripted)
    layouts = []
    compact = sampler_module.DecodeCache.compact

    def spy(self, groups, slots):
        layouts.append(tuple(slots.shape))
        return compact(self, groups, slots)

    monkeypatch.setattr(sampler_module.DecodeCache, "compact", spy)
    sampler = ProofSampler(model, tokenizer)
    sampler._keep_finished = keep_finished
    out = sampler.sample_ids(prompts, 3, 6, eos_token_id=eos, progress=False)
    assert [len(t) for per in out for t, _ in per] == [3, 6, 6, 2, 5, 4]
    assert layouts == [(2, 2), (1, 2)]  # half the slots empty, then a prompt done
    for step, rows in enumerate(seen):
        for i, got in rows.items():
            ids = torch.tensor([prompts[i // 3] + script[i][:step]])
            want = model(ids).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_custom_generate_matches_hf(model, tokenizer):
    """model.generate(..., custom_generate=fastdf.prover.generate): greedy over a left-padded
    batch equals HF's own generate."""
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(do_sample=False, max_new_tokens=9, pad_token_id=3)
    want = model.generate(**batch, **kw)
    got = model.generate(**batch, custom_generate=fastdf.prover.generate, **kw)
    assert torch.equal(got, want)


def test_custom_generate_samples_k_sequences_per_prompt(model_factory, tokenizer):
    model = model_factory("llama")
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    kw = dict(do_sample=True, num_return_sequences=5, max_new_tokens=7, top_p=0.9, top_k=20, temperature=0.8,
              custom_generate=fastdf.prover.generate)
    torch.manual_seed(0)
    a = model.generate(ids, **kw)
    torch.manual_seed(0)
    b = model.generate(ids, **kw)
    assert a.shape[0] == 5 and torch.equal(a, b)
    assert torch.equal(a[:, : ids.shape[1]], ids.expand(5, -1))
    with pytest.raises(NotImplementedError, match="NoRepeatNGramLogitsProcessor"):
        model.generate(ids, no_repeat_ngram_size=2, **kw)


def test_repetition_penalty_matches_hf_processor_and_generate(model_factory, tokenizer):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    ids = torch.randint(0, 50, (4, 7), generator=g)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), want)

    model = model_factory("llama")
    out = ProofSampler(model, tokenizer).sample(PROMPTS[:2], num_samples=1, max_new_tokens=12, temperature=0.0,
                                                repetition_penalty=1.3, progress=False)
    for prompt, per in zip(PROMPTS, out):
        assert per[0].token_ids == hf_greedy(model, tokenizer, prompt, 12, repetition_penalty=1.3)[: per[0].num_tokens]


def test_stop_strings_cut_the_text(model_factory, tokenizer):
    model = model_factory("llama")
    sampler = ProofSampler(model, tokenizer)
    full = sampler.sample(PROMPTS[0], num_samples=1, max_new_tokens=16, temperature=0.0, progress=False)[0][0]
    # A stop string: the first generated token (after the 2nd) that decodes to fresh ASCII text.
    for j in range(2, full.num_tokens):
        piece = tokenizer.decode([full.token_ids[j]])
        before = tokenizer.decode(full.token_ids[:j])
        if piece.strip() and piece.isascii() and piece.isprintable() and piece not in before + piece[:-1]:
            break
    else:
        pytest.skip("greedy output has no usable ASCII token")
    out = sampler.sample(PROMPTS[0], num_samples=3, max_new_tokens=16, temperature=0.0, stop=["@@never@@", piece],
                         progress=False)[0]
    text = tokenizer.decode(full.token_ids[: j + 1])
    for c in out:
        assert c.finish_reason == "stop" and c.num_tokens == j + 1
        assert c.token_ids == full.token_ids[: j + 1]
        assert c.text == text[: text.find(piece)] and piece not in c.text


def test_sampling_is_seeded_and_reasons_are_consistent(model_factory, tokenizer):
    model = model_factory("mistral")
    sampler = ProofSampler(model, tokenizer)
    kw = dict(num_samples=6, max_new_tokens=10, temperature=1.0, top_p=0.95, min_p=0.01, seed=4,
              eos_token_id=[5, 9, 11, 40, 77], repetition_penalty=1.2, progress=False)
    a = sampler.sample(PROMPTS, **kw)
    b = sampler.sample(PROMPTS, **kw)
    c = sampler.sample(PROMPTS, **{**kw, "seed": 5})
    sampler._keep_finished = True  # the CUDA-graph batch policy draws the same tokens
    d = sampler.sample(PROMPTS, **kw)
    ids = lambda out: [[x.token_ids for x in per] for per in out]  # noqa: E731
    assert ids(a) == ids(b) == ids(d) and ids(a) != ids(c)
    assert len({x.finish_reason for per in a for x in per}) == 2  # some stop early, some run out
    for per in a:
        for x in per:
            if x.finish_reason == "eos":
                assert x.token_ids[-1] in kw["eos_token_id"]
            else:
                assert x.finish_reason == "length" and x.num_tokens == 10
                assert not set(x.token_ids) & set(kw["eos_token_id"])
    # Per-prompt streams: a prompt's samples do not depend on its batch mates, the batch
    # size, or whether it is sampled alone with its own seed (how prove shards over ranks).
    assert ids(sampler.sample(PROMPTS, **kw, batch_size=1)) == ids(a)
    alone = sampler.sample(PROMPTS[2:0:-1], **{**kw, "seed": [prompt_seed(4, 2), prompt_seed(4, 1)]})
    assert ids(alone) == ids(a)[2:0:-1]
    with pytest.raises(ValueError, match="got 1 seeds for 3 prompts"):
        sampler.sample(PROMPTS, **{**kw, "seed": [1]})
    with pytest.raises(TypeError, match=r"seed\[1\] must be an int"):
        sampler.sample(PROMPTS[:2], **{**kw, "seed": [1, 2.5]})


def test_bad_arguments(model_factory, tokenizer):
    model = model_factory("llama")
    sampler = ProofSampler(model, tokenizer)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sampler.sample("x", num_samples=0)
    with pytest.raises(ValueError, match="top_p must be > 0"):
        sampler.sample("x", top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampler.sample("x", temperature=-1.0)
    with pytest.raises(ValueError, match=r"stop strings must be non-empty; stop\[0\] is ''"):
        sampler.sample("x", stop=[""])
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
        sampler.sample([1, 2])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ProofSampler(model).sample("x")

    broken = model_factory("llama")
    with torch.no_grad():
        broken.lm_head.weight[7, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or \\+inf logits"):
        ProofSampler(broken, tokenizer).sample("x", num_samples=2, max_new_tokens=3, progress=False)

    class NotALM(torch.nn.Module):
        config = type("Config", (), {"model_type": "gpt2"})()

    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ProofSampler(NotALM(), tokenizer)



NAN, INF = float("nan"), float("inf")
BAD_SAMPLE_IDS = [  # (kwargs, prompts, error, message)
    (dict(), [[1.5, 2.7]], TypeError, r"prompts\[0\]\[0\] must be an int token id, got float 1.5"),
    (dict(), [[5, True]], TypeError, r"prompts\[0\]\[1\] must be an int token id, got bool"),
    (dict(), [["5"]], TypeError, r"prompts\[0\]\[0\] must be an int token id, got str"),
    (dict(), [[5, 10**6]], ValueError, r"prompts\[0\]\[1\] = 1000000 is outside the model's vocabulary \[0, "),
    (dict(), [[5], [-1]], ValueError, r"prompts\[1\]\[0\] = -1 is outside"),
    (dict(), [[5], []], ValueError, r"prompts\[1\] is empty"),
    (dict(), "abc", TypeError, "prompts must be a list of token id lists, got str"),
    (dict(), [5, 6], TypeError, r"prompts\[0\] must be a list of token ids, got int"),
    (dict(), [torch.tensor([1.0, 2.0])], TypeError, r"prompts\[0\] must be a 1-D integer tensor"),
    (dict(stop=123), [[5]], TypeError, "stop must be a string or a list of strings, got int"),
    (dict(stop=["ok", 3]), [[5]], TypeError, r"stop\[1\] is a int"),
    (dict(seed=2**70), [[5]], ValueError, "seed must be < 18446744073709551616"),
    (dict(seed=1.5), [[5]], TypeError, "seed must be an int"),
    (dict(seed=0, generator=torch.Generator()), [[5]], ValueError, "seed or generator, not both"),
    (dict(generator=0), [[5]], TypeError, "generator must be a torch.Generator"),
    (dict(eos_token_id="x"), [[5]], TypeError, "eos_token_id must be an int or a list of ints, got str"),
    (dict(eos_token_id=[2, 1.0]), [[5]], TypeError, "eos_token_id must be an int or a list of ints, got float"),
    (dict(eos_token_id=10**6), [[5]], ValueError, "eos_token_id 1000000 is outside the model's vocabulary"),
    (dict(repetition_penalty=NAN), [[5]], ValueError, "repetition_penalty must be finite, got nan"),
    (dict(repetition_penalty=INF), [[5]], ValueError, "repetition_penalty must be finite"),
    (dict(repetition_penalty=0.0), [[5]], ValueError, "repetition_penalty must be >="),
    (dict(temperature=NAN), [[5]], ValueError, "temperature must be finite, got nan"),
    (dict(temperature=1e300), [[5]], ValueError, "temperature = .* is not representable in float32"),
    (dict(temperature="1"), [[5]], TypeError, "temperature must be a number, got str"),
    (dict(top_p=NAN), [[5]], ValueError, "top_p must be finite"),
    (dict(top_p=1.5), [[5]], ValueError, "top_p must be <= 1"),
    (dict(min_p=NAN), [[5]], ValueError, "min_p must be finite"),
    (dict(top_k=2.5), [[5]], TypeError, "top_k must be an int"),
    (dict(top_k=-1), [[5]], ValueError, "top_k must be >= 0"),
    (dict(max_new_tokens=0), [[5]], ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2**31), [[5]], ValueError, "max_new_tokens must be <= 2147483647"),
    (dict(max_new_tokens=2**31 - 1), [[5]], ValueError, "max_new_tokens = 2147483647 plus prompts\\[0\\]'s 1 tokens"),
    (dict(max_new_tokens=3.0), [[5]], TypeError, "max_new_tokens must be an int"),
    (dict(num_samples=True), [[5]], TypeError, "num_samples must be an int"),
    (dict(batch_size=0), [[5]], ValueError, "batch_size must be >= 1"),
    (dict(progress="no"), [[5]], TypeError, "progress must be a bool"),
]


@pytest.fixture
def guarded_sampler(model_factory, tokenizer, monkeypatch):
    """A sampler whose model must not run: validation comes before any work."""
    sampler = ProofSampler(model_factory("llama"), tokenizer)

    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(sampler.decoder, "prefill", no_work)
    monkeypatch.setattr(sampler, "_generate", no_work)
    return sampler


@pytest.mark.parametrize("kwargs,prompts,error,match", BAD_SAMPLE_IDS)
def test_sample_ids_rejects_bad_arguments_before_any_work(guarded_sampler, kwargs, prompts, error, match):
    kwargs = {"num_samples": 2, "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        guarded_sampler.sample_ids(prompts, **kwargs)


def test_sample_checks_knobs_before_tokenising(guarded_sampler):
    calls = []
    tokenizer = guarded_sampler.tokenizer
    guarded_sampler.tokenizer = lambda text: calls.append(text) or tokenizer(text)
    for kwargs, error, match in [(dict(repetition_penalty=NAN), ValueError, "repetition_penalty must be finite"),
                                 (dict(stop=123), TypeError, "stop must be a string"),
                                 (dict(seed=2**70), ValueError, "seed must be <"),
                                 (dict(eos_token_id="x"), TypeError, "eos_token_id must be")]:
        with pytest.raises(error, match=match):
            guarded_sampler.sample(["theorem"], **kwargs)
    assert calls == []
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        ProofSampler(guarded_sampler.model, tokenizer, cuda_graphs="yes")


def test_integer_like_prompts_and_extreme_knobs(model_factory, tokenizer):
    import numpy as np

    sampler = ProofSampler(model_factory("llama"), tokenizer)
    kw = dict(num_samples=2, max_new_tokens=4, temperature=0.0, progress=False)
    want = sampler.sample_ids([[5, 17, 40]], **kw)
    assert sampler.sample_ids([torch.tensor([5, 17, 40])], **kw) == want
    assert sampler.sample_ids([np.array([5, 17, 40])], **kw) == want
    assert sampler.sample_ids([(np.int64(5), 17, torch.tensor(40))], **kw) == want
    assert sampler.sample_ids([[5, 17, 40]], eos_token_id=np.int64(2), **kw) == sampler.sample_ids(
        [[5, 17, 40]], eos_token_id=[2], **kw)
    assert sampler.sample_ids([], **kw) == []
    # The largest allowed temperature draws from the flat distribution; the most extreme
    # penalties saturate the logits instead of making them infinite (no NaN).
    for knobs in (dict(temperature=float(torch.finfo(torch.float32).max)),
                  dict(temperature=1.0, repetition_penalty=float(torch.finfo(torch.float32).tiny)),
                  dict(temperature=1.0, repetition_penalty=float(torch.finfo(torch.float32).max))):
        out = sampler.sample_ids([[5, 17, 40]], **{**kw, **knobs}, seed=0)
        assert all(0 <= t < len(tokenizer) for ids, _ in out[0] for t in ids)


def test_repetition_penalty_saturates_instead_of_overflowing():
    logits = torch.tensor([[30.0, -30.0, 2.0, -1.0]])
    seen = torch.tensor([[True, True, False, True]])
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    boosted = apply_repetition_penalty(logits, seen, tiny)
    assert torch.isfinite(boosted).all() and boosted[0, 0] == big and boosted[0, 2] == 2.0
    banned = apply_repetition_penalty(logits, seen, big)
    assert torch.isfinite(banned).all() and banned[0, 1] == -big and banned[0, 3] == -big
    assert banned[0, 0] == 30.0 / big
    ordinary = apply_repetition_penalty(logits, seen, 1.3)  # finite results are HF's exactly
    assert torch.equal(ordinary, torch.tensor([[30.0 / 1.3, -30.0 * 1.3, 2.0, -1.0 * 1.3]]))


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_and_hf(model_factory, tokenizer):
    """On the GPU (Triton attention, CUDA sampling): the CUDA-graph decode loop draws the
    same tokens as the eager loop, and greedy still equals HF generate."""
    import warnings

    model = model_factory("qwen2", dtype=torch.float32).cuda()
    kw = dict(num_samples=8, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=1, eos_token_id=[5, 9, 11, 40],
              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and decodes eagerly: fail instead
        graphed = ProofSampler(model, tokenizer, cuda_graphs=True).sample(PROMPTS, **kw)
        greedy = ProofSampler(model, tokenizer, cuda_graphs=True).sample(PROMPTS, num_samples=2, max_new_tokens=10,
                                                                         temperature=0.0, progress=False)
    eager = ProofSampler(model, tokenizer, cuda_graphs=False).sample(PROMPTS, **kw)
    assert [[c.token_ids for c in per] for per in graphed] == [[c.token_ids for c in per] for per in eager]
    for prompt, per in zip(PROMPTS, greedy):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        want = model.generate(ids, do_sample=False, max_new_tokens=10)[0, ids.shape[1]:].tolist()
        assert per[0].token_ids == want[: per[0].num_tokens]


def test_seeded_draws_follow_the_per_prompt_streams(model_factory, tokenizer):
    """With a seed, sample n of prompt g draws token t with the uniform
    _uniforms(prompt_seed(seed, g), n, t): replayed with HF's forward and the readable
    sampling reference, every token agrees (the rows are indexed by prompt and slot, not by
    batch position, through finishing samples and compaction)."""
    from fastdf.ops.sampling import sample_reference

    model = model_factory("llama")
    knobs = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02)
    kw = dict(num_samples=3, max_new_tokens=8, seed=11, progress=False, **knobs)
    sampler = ProofSampler(model, tokenizer)
    first = sampler.sample(PROMPTS, eos_token_id=[], **kw)
    # Sample (0, 0)'s third token as EOS: the same draws, so that sample (and any other
    # drawing it) now finishes early and the rows behind it shift.
    out = sampler.sample(PROMPTS, eos_token_id=first[0][0].token_ids[2], **kw)
    assert out[0][0].token_ids == first[0][0].token_ids[:3] and out[0][0].finish_reason == "eos"
    for g, (prompt, per) in enumerate(zip(PROMPTS, out)):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        for n, c in enumerate(per):
            seq = ids
            for t, token in enumerate(c.token_ids):
                with torch.no_grad():
                    logits = model(seq).logits[:, -1]
                u = sampler_module._uniforms(np.array([prompt_seed(11, g)], dtype=np.uint64),
                                             np.array([n], dtype=np.uint64), t)
                want, _ = sample_reference(logits, u, *(torch.tensor([v]) for v in knobs.values()))
                assert token == int(want), (g, n, t)
                seq = torch.cat([seq, torch.tensor([[token]])], 1)
