"""Bad input to KVCache / DFAttention / DFBlock (issue 9): errors name the argument, integers
are checked before the cache changes, a failed call leaves the cache as it was, and windows
or frames larger than the sequence act as no window instead of failing in the op."""

import math

import pytest
import torch

import fastdf.nn.attention as attention_module
from fastdf.nn import DFAttention, DFBlock, KVCache


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _state(cache):
    """Everything that defines a cache's contents."""
    keys = None if cache.keys is None else (cache.keys.clone(), cache.values.clone())
    return cache.frames, cache.cached_frames, cache._pending is None, keys


def _same(a, b):
    assert a[:3] == b[:3]
    if a[3] is not None:
        torch.testing.assert_close(a[3][0], b[3][0], rtol=0, atol=0)
        torch.testing.assert_close(a[3][1], b[3][1], rtol=0, atol=0)


def _filled_cache():
    cache = KVCache(frame_size=2, window_frames=3, sink_frames=1)
    k = torch.randn(1, 2, 4, 8)
    cache.append(k, k + 1)
    cache.extend(k, k + 1)  # pending: 2 frames
    return cache


@pytest.mark.parametrize("num_frames,error", [(1.5, TypeError), (True, TypeError), ("1", TypeError),
                                              (None, TypeError), (-1, ValueError), (3, ValueError)])
def test_commit_validates_before_it_mutates(num_frames, error):
    cache = _filled_cache()
    before = _state(cache)
    with pytest.raises(error, match="num_frames|commit_frames"):
        cache.commit(num_frames)
    _same(_state(cache), before)
    cache.commit(1)  # the pending frames are still committable
    assert cache.frames == 3


def test_commit_without_extend_is_a_value_error():
    with pytest.raises(ValueError, match="call extend"):
        KVCache(frame_size=2).commit(1)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(frame_size=0), ValueError, "frame_size"), (dict(frame_size=2.0), TypeError, "frame_size"),
    (dict(frame_size=True), TypeError, "frame_size"), (dict(window_frames=0), ValueError, "window_frames"),
    (dict(window_frames=1.5), TypeError, "window_frames"), (dict(sink_frames=-1), ValueError, "sink_frames"),
    (dict(capacity_frames=-1), ValueError, "capacity_frames"), (dict(capacity_frames=2.0), TypeError, "capacity"),
])
def test_cache_constructor_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        KVCache(**kwargs)


def test_extend_checks_k_and_v():
    cache = KVCache(frame_size=2)
    k = torch.randn(1, 2, 4, 8)
    for args, error, name in [((k.tolist(), k), TypeError, "k must be"), ((k, k.double()), ValueError, "v has dtype"),
                              ((k.long(), k.long()), TypeError, "floating"), ((k, k[:, :1]), ValueError, "k and v")]:
        with pytest.raises(error, match=name):
            cache.extend(*args)
    assert cache.keys is None and cache._pending is None


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(num_heads=0), ValueError, "num_heads"), (dict(dim=0), ValueError, "dim"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"), (dict(head_dim=0), ValueError, "head_dim"),
    (dict(num_heads=2.0), TypeError, "num_heads"), (dict(dim=1, num_heads=2), ValueError, "head_dim"),
    (dict(frame_size=0), ValueError, "frame_size"), (dict(window_frames=0), ValueError, "window_frames"),
    (dict(norm_eps=math.nan), ValueError, "norm_eps"), (dict(norm_eps=0.0), ValueError, "norm_eps"),
    (dict(rope_theta=math.nan), ValueError, "rope_theta"), (dict(rope_theta=1e300), ValueError, "rope_theta"),
    (dict(causal=1), TypeError, "causal"), (dict(causal=False, window_frames=2), ValueError, "causal"),
    (dict(dim=10**30), ValueError, "dim"),
])
def test_attention_constructor_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        DFAttention(**{"dim": 16, "num_heads": 2, **kwargs})


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(mlp_ratio=math.nan), ValueError, "mlp_ratio"), (dict(mlp_ratio=1e-9), ValueError, "mlp_ratio"),
    (dict(eps=math.inf), ValueError, "eps"), (dict(norm="batch"), ValueError, "norm"),
    (dict(norm=None), TypeError, "norm"), (dict(cond_dim=0), ValueError, "cond_dim"),
])
def test_block_constructor_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        DFBlock(**{"dim": 16, "num_heads": 2, **kwargs})


def test_forward_checks_before_the_cache_changes():
    attn = _randomize(DFAttention(16, 2, frame_size=2, window_frames=2, rope_theta=100.0))
    cache = attn.new_cache()
    with torch.no_grad():
        attn(torch.randn(1, 4, 16), cache=cache, commit_frames=1)
    before = _state(cache)
    x = torch.randn(1, 4, 16)
    for kwargs, error, name in [
        (dict(commit_frames=1.5), TypeError, "commit_frames"), (dict(commit_frames=3), ValueError, "commit_frames"),
        (dict(x=x[..., :8]), ValueError, "x must be"), (dict(x=x.long()), TypeError, "x must be"),
        (dict(x=x[:, :3]), ValueError, "whole frames"), (dict(x=x[:0]), ValueError, "B >= 1"),
        (dict(positions=torch.arange(3)), ValueError, "positions"),
        (dict(positions=torch.arange(4.0)), TypeError, "positions"),
        (dict(window=3), TypeError, "window"), (dict(window=(0, 0)), ValueError, "window_frames"),
        (dict(cache="cache"), TypeError, "cache"),
    ]:
        args = {"x": x, "cache": cache, **kwargs}
        with pytest.raises(error, match=name), torch.no_grad():
            attn(args.pop("x"), **args)
        _same(_state(cache), before)


def test_failed_attention_leaves_nothing_to_commit(monkeypatch):
    attn = _randomize(DFAttention(16, 2, frame_size=2))
    cache = attn.new_cache()
    with torch.no_grad():
        attn(torch.randn(1, 4, 16), cache=cache, commit_frames=1)
    before = _state(cache)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(attention_module, "df_attention", broken)
    with pytest.raises(RuntimeError, match="kernel failed"), torch.no_grad():
        attn(torch.randn(1, 4, 16), cache=cache, commit_frames=2)
    _same(_state(cache), before)
    with pytest.raises(ValueError, match="call extend"):  # the failed call's frames cannot be committed
        cache.commit(1)


@pytest.mark.parametrize("huge", [10**30, 2**63])
def test_window_longer_than_the_sequence_is_no_window(huge):
    x = torch.randn(2, 12, 16)
    plain = _randomize(DFAttention(16, 2, frame_size=2, rope_theta=100.0))
    windowed = DFAttention(16, 2, frame_size=2, window_frames=huge, sink_frames=huge, rope_theta=100.0)
    windowed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        want = plain(x)
        torch.testing.assert_close(windowed(x), want)
        torch.testing.assert_close(plain(x, window=(huge, 1)), want)
        cache = windowed.new_cache()  # never evicts, preallocates a bounded buffer
        got = torch.cat([windowed(x[:, i:i + 2], cache=cache, commit_frames=1) for i in range(0, 12, 2)], 1)
    torch.testing.assert_close(got, want)
    assert cache.frames == cache.cached_frames == 6 and cache._k.shape[1] < 10**5


def test_frame_longer_than_the_sequence_is_one_frame():
    x = torch.randn(1, 6, 16)
    whole = _randomize(DFAttention(16, 2, frame_size=6))
    huge = DFAttention(16, 2, frame_size=2**31 - 1)
    huge.load_state_dict(whole.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(huge(x), whole(x))
    with pytest.raises(ValueError, match="frame_size"):
        DFAttention(16, 2, frame_size=10**30)


def test_block_checks_c_before_running():
    block = _randomize(DFBlock(16, 2, frame_size=2))
    x = torch.randn(1, 4, 16)
    for c, name in [(torch.randn(1, 0, 16), "F >= 1"), (torch.randn(1, 3, 16), "multiple of F"),
                    (torch.randn(1, 2, 8), "c must be"), (torch.randn(2, 16), "c must have 3 dims")]:
        with pytest.raises(ValueError, match=name):
            block(x, c)
