"""apply(transformer, cache=True): how reuse is decided and where the cached K/V live.
The key's fast path (the same tensor object, version counter unchanged) and its exact
fallback, inference tensors, a call that fails midway, and the per-layer K/V buffers being
rewritten in place (one call's K/V per context), all checked against the uncached forward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fastdf.integrations._skyreels as _skyreels  # noqa: E402
import fastdf.integrations.diffusers as fdd  # noqa: E402

from .test_diffusers import _inputs  # noqa: E402
from .test_diffusers_cache import _call, _pair  # noqa: E402

TOKENS = 12  # tokens per latent frame of _inputs' default 6x8 latents (2x2 patches)


def _computed(model, kw, context="cond"):
    before = fdd.cache_stats(model)["tokens_computed"]
    out = _call(model, kw, context)
    return out, fdd.cache_stats(model)["tokens_computed"] - before


def _state(model, context="cond"):
    return model._diffusers_hook.get_hook(fdd.HOOK_NAME).state_manager._state_cache[context]


def test_in_place_change_of_the_same_embeddings_invalidates():
    plain, cached = _pair()
    kw = _inputs(plain, frames=6)
    _call(cached, kw)
    out, n = _computed(cached, kw)  # the same objects: the fast path, everything reused
    assert n == 0
    torch.testing.assert_close(out, _call(plain, kw, None), rtol=1e-6, atol=1e-6)
    kw["encoder_hidden_states"].mul_(2)  # same object, new content: its version counter moved
    out, n = _computed(cached, kw)
    assert n == 6 * TOKENS
    torch.testing.assert_close(out, _call(plain, kw, None), rtol=1e-6, atol=1e-6)
    # an equal copy (another object) matches through the exact comparison
    out, n = _computed(cached, dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone()))
    assert n == 0


def test_inference_tensors_have_no_fast_path_but_stay_exact():
    plain, cached = _pair()
    with torch.inference_mode():
        kw = _inputs(plain, frames=6)
        ref = plain(**kw)[0]
        with cached.cache_context("cond"):
            cached(**kw)
            out = cached(**kw)[0]
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            assert fdd.cache_stats(cached)["tokens_computed"] == 6 * TOKENS  # reused through torch.equal
            kw["encoder_hidden_states"].add_(1)  # no version counter: compared by content, so seen
            out = cached(**kw)[0]
        torch.testing.assert_close(out, plain(**kw)[0], rtol=1e-6, atol=1e-6)
    assert fdd.cache_stats(cached)["tokens_computed"] == 2 * 6 * TOKENS


def test_kv_buffers_rewritten_in_place_and_window_changes():
    plain, cached = _pair()
    kw = _inputs(plain, frames=6)
    _call(cached, kw)
    buffers = [(k.data_ptr(), v.data_ptr()) for k, v in _state(cached).kv]
    g = torch.Generator().manual_seed(3)
    for step in range(3):  # block 0 fixed, later frames changing: same buffers every call
        kw = dict(kw, hidden_states=kw["hidden_states"].clone())
        kw["hidden_states"][:, :, 2:] = torch.randn(kw["hidden_states"][:, :, 2:].shape, generator=g)
        out, n = _computed(cached, kw)
        assert n == 4 * TOKENS
        torch.testing.assert_close(out, _call(plain, kw, None), rtol=1e-6, atol=1e-6)
        assert [(k.data_ptr(), v.data_ptr()) for k, v in _state(cached).kv] == buffers
    # the window shrinks to its first two blocks (all reused), then grows back with a new
    # last block, then past the buffers' capacity (reallocated, prefix kept)
    short = dict(kw, hidden_states=kw["hidden_states"][:, :, :4].clone(), timestep=kw["timestep"][:, :4].clone())
    out, n = _computed(cached, short)
    assert n == 0
    torch.testing.assert_close(out, _call(plain, short, None), rtol=1e-6, atol=1e-6)
    back = dict(kw, hidden_states=kw["hidden_states"].clone())
    back["hidden_states"][:, :, 4:] += 1
    out, n = _computed(cached, back)
    assert n == 2 * TOKENS
    torch.testing.assert_close(out, _call(plain, back, None), rtol=1e-6, atol=1e-6)
    longer = dict(back, hidden_states=torch.cat([back["hidden_states"], torch.randn(1, 4, 2, 6, 8, generator=g)], 2),
                  timestep=torch.cat([back["timestep"], back["timestep"][:, :2]], 1))
    out, n = _computed(cached, longer)
    assert n == 2 * TOKENS
    torch.testing.assert_close(out, _call(plain, longer, None), rtol=1e-6, atol=1e-6)
    assert _state(cached).kv[0][0].shape[1] == 8 * TOKENS


def test_call_failing_midway_leaves_nothing_reusable(monkeypatch):
    plain, cached = _pair()
    kw = _inputs(plain, frames=6)
    _call(cached, kw)
    tail = dict(kw, hidden_states=kw["hidden_states"].clone())
    tail["hidden_states"][:, :, 4:] += 1
    calls = []
    original = _skyreels.block_forward

    def failing(block, *args, **kwargs):
        calls.append(block)
        if len(calls) == 2:  # the second layer of the cached call: the first already wrote its buffers
            raise RuntimeError("interrupted")
        return original(block, *args, **kwargs)

    monkeypatch.setattr(_skyreels, "block_forward", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        _call(cached, tail)
    monkeypatch.setattr(_skyreels, "block_forward", original)
    # kw's three blocks plus a new one: were kw's blocks still taken as cached, the first
    # layer's keys of block 2 would be the failed call's
    grown = dict(kw, hidden_states=torch.cat([kw["hidden_states"], kw["hidden_states"][:, :, :2]], 2),
                 timestep=torch.cat([kw["timestep"], kw["timestep"][:, :2]], 1))
    out, n = _computed(cached, grown)
    assert n == 8 * TOKENS
    torch.testing.assert_close(out, _call(plain, grown, None), rtol=1e-6, atol=1e-6)
