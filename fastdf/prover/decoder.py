"""A compact decode forward for HF causal LMs of the Llama / Qwen2 / Mistral families that
reads the prompt's K/V once per step for all its samples.

It calls the model's own submodules (embedding, RMSNorms, q/k/v/o projections with their
biases, MLP, final norm, lm_head, rotary embedding and ``apply_rotary_pos_emb``) and
replaces only the attention: each prompt's K/V is stored once (``[G, Hkv, P, D]`` per
layer, from the HF prefill) and each sample's generated tokens go to a preallocated suffix
cache (``[G, N, Hkv, max_new, D]``); ``fastdf.shared_prefix_attention`` combines them.
"""

from __future__ import annotations

import importlib

import torch

from ..ops.cascade import shared_prefix_attention

FAMILIES = ("llama", "qwen2", "mistral")


class PrefixDecoder:
    """The decode-time view of ``model`` (weights are shared, nothing is copied)."""

    def __init__(self, model):
        config = getattr(model, "config", None)
        family = getattr(config, "model_type", None)
        if family not in FAMILIES:
            raise ValueError(
                f"model must be an HF causal LM of the {', '.join(FAMILIES)} families, got model_type {family!r}"
            )
        base = getattr(model, "model", None)
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if base is None or lm_head is None or not hasattr(base, "layers"):
            raise ValueError(f"model ({type(model).__name__}) has no .model.layers / lm_head: pass the *ForCausalLM model")
        self.model = model
        self.base = base
        self.lm_head = lm_head
        self.layers = list(base.layers[: config.num_hidden_layers])
        attn = self.layers[0].self_attn
        for layer in self.layers:
            a = layer.self_attn
            if hasattr(a, "q_norm") or hasattr(a, "k_norm"):
                raise ValueError(f"{type(a).__name__} normalises q/k per head, which this decoder does not implement")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        self.apply_rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        self.window = self._sliding_window(config, family)

    @staticmethod
    def _sliding_window(config, family):
        window = getattr(config, "sliding_window", None)
        if window is None:
            return None
        if family == "mistral":
            return window
        layer_types = getattr(config, "layer_types", None) or []
        return window if "sliding_attention" in layer_types else None

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def check_length(self, total):
        if self.window is not None and total > self.window:
            raise NotImplementedError(
                f"prompt + max_new_tokens = {total} exceeds the model's sliding window ({self.window}); "
                "sliding-window decode is not implemented"
            )

    def prefill(self, prompts: list[list[int]]):
        """Run the HF model once over the distinct prompts (right-padded batch).

        Returns ``(keys, values, lengths, logits)``: per layer ``[G, Hkv, P, D]`` K/V
        (positions past a prompt's length are padding, masked by ``lengths``), int32
        ``[G]``, and the next-token logits ``[G, V]`` (float32, or float64 for fp64 models).
        """
        device = self.device
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        longest = int(lengths.max())
        ids = torch.zeros(len(prompts), longest, dtype=torch.int64, device=device)
        mask = torch.zeros(len(prompts), longest, dtype=torch.int64, device=device)
        for g, p in enumerate(prompts):
            ids[g, : len(p)] = torch.tensor(p, dtype=torch.int64, device=device)
            mask[g, : len(p)] = 1
        out = self.base(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.cache
        keys = [cache.layers[i].keys for i in range(len(self.layers))]
        values = [cache.layers[i].values for i in range(len(self.layers))]
        last = out.last_hidden_state[torch.arange(len(prompts), device=device), lengths - 1]
        logits = self.logits(last)
        return keys, values, lengths.to(torch.int32), logits

    def logits(self, hidden):
        logits = self.lm_head(hidden)
        return logits.double() if logits.dtype == torch.float64 else logits.float()

    def step(self, tokens, positions, group, slot, cache, t):
        """One decode step for the batch rows.

        tokens, positions, group, slot: int64 ``[B]`` (row b sits at ``(group[b],
        slot[b])`` of the ``[G, N]`` layout, rows in layout order). ``t``: int64 tensor,
        the suffix position this step's K/V go to (a tensor, so a CUDA graph of the step
        replays for every t). Returns logits ``[B, V]``.
        """
        B = tokens.shape[0]
        G, N = cache.suffix_lens.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        h = self.base.embed_tokens(tokens)[:, None, :]
        cos, sin = self.base.rotary_emb(h, positions[:, None])
        t = t.expand(B)
        dense = B == G * N  # every slot filled, in layout order: views, no scatter
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, 1, hq, d).transpose(1, 2)
            k = attn.k_proj(x).view(B, 1, hkv, d).transpose(1, 2)
            v = attn.v_proj(x).view(B, 1, hkv, d).transpose(1, 2)
            q, k = self.apply_rope(q, k, cos, sin)
            cache.k_suffix[i][group, slot, :, t] = k[:, :, 0]
            cache.v_suffix[i][group, slot, :, t] = v[:, :, 0]
            if dense:
                q_layout = q[:, :, 0].reshape(G, N, hq, d)
            else:
                q_layout = q.new_zeros(G, N, hq, d)
                q_layout[group, slot] = q[:, :, 0]
            o = shared_prefix_attention(q_layout, cache.k_prefix[i], cache.v_prefix[i], cache.k_suffix[i],
                                        cache.v_suffix[i], prefix_lens=cache.prefix_lens,
                                        suffix_lens=cache.suffix_lens, scale=self.scale)
            o = o.reshape(B, hq * d) if dense else o[group, slot].reshape(B, hq * d)
            h = h + attn.o_proj(o)[:, None, :]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.base.norm(h)
        return self.logits(h[:, 0])


class StepGraph:
    """``PrefixDecoder.step`` captured in a CUDA graph for one batch layout: replaying it
    costs one launch instead of ~40 per layer. Inputs are copied into static buffers;
    the returned logits buffer is overwritten by the next replay. Rebuild it whenever the
    layout or the cache tensors change (compaction)."""

    def __init__(self, decoder, cache, tokens, positions, group, slot, t):
        self.static = [tokens.clone(), positions.clone(), group.clone(), slot.clone()]
        self.t = t.clone()
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):  # warm-up: compiles kernels, settles the allocator
            for _ in range(2):
                decoder.step(*self.static, cache, self.t)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step(*self.static, cache, self.t)

    def __call__(self, tokens, positions, t):
        self.static[0].copy_(tokens)
        self.static[1].copy_(positions)
        self.t.copy_(t)
        self.graph.replay()
        return self.logits


class DecodeCache:
    """Prefix K/V per prompt (stored once) and per-sample suffix K/V, for every layer.

    ``suffix_lens [G, N]`` is the number of visible suffix keys of each slot (0 for an
    empty slot).
    """

    def __init__(self, keys, values, prefix_lens, num_samples, max_new_tokens):
        G, hkv, _, d = keys[0].shape
        self.k_prefix, self.v_prefix = list(keys), list(values)
        self.prefix_lens = prefix_lens
        shape = (G, num_samples, hkv, max_new_tokens, d)
        self.k_suffix = [torch.empty(shape, dtype=k.dtype, device=k.device) for k in keys]
        self.v_suffix = [torch.empty(shape, dtype=k.dtype, device=k.device) for k in keys]
        self.suffix_lens = torch.zeros(G, num_samples, dtype=torch.int32, device=keys[0].device)

    def compact(self, groups, slots):
        """Keep layout cells ``[groups[g], slots[g, n]]`` (int64 ``[G']`` and ``[G', N']``):
        finished samples and prompts leave the layout, so later steps skip them."""
        self.k_prefix = [k.index_select(0, groups) for k in self.k_prefix]
        self.v_prefix = [v.index_select(0, groups) for v in self.v_prefix]
        self.prefix_lens = self.prefix_lens.index_select(0, groups)
        rows = groups[:, None].expand_as(slots)
        self.k_suffix = [k[rows, slots] for k in self.k_suffix]
        self.v_suffix = [v[rows, slots] for v in self.v_suffix]
        self.suffix_lens = self.suffix_lens[rows, slots]
