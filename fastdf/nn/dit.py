"""A DiT block with per-frame AdaLN-Zero and frame-causal attention (Diffusion Forcing)."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.adaln import adaln_modulate, gated_residual
from .attention import DFAttention, KVCache


class DFBlock(nn.Module):
    """DiT block conditioned per frame (each frame has its own noise level in Diffusion
    Forcing), with frame-causal attention::

        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(c).chunk(6, -1)   # [B, F, C] each
        x = x + gate1[frame] * attn(LN(x) * (1 + scale1[frame]) + shift1[frame])
        x = x + gate2[frame] * mlp(LN(x) * (1 + scale2[frame]) + shift2[frame])

    LN has no affine (as DiT); ``frame = t // (T // F)``. The modulation is computed per
    frame and read per token inside fastdf's kernels (never expanded to [B, T, C]).
    AdaLN-Zero: the modulation's last layer starts at zero, so a new block is the identity.

    Args:
        dim: width C. num_heads / num_kv_heads / head_dim: attention heads (GQA allowed).
        cond_dim: width of the per-frame conditioning c (default C).
        mlp_ratio: MLP hidden width / C (GELU, tanh approximation, as DiT).
        frame_size, window_frames, sink_frames: the attention mask (``fastdf.df_attention``).
        qk_norm, rope_theta, qkv_bias: see :class:`DFAttention`.
        norm: ``"layer"`` or ``"rms"`` for the two AdaLN norms; ``eps`` their epsilon.

    Parameters (state_dict keys): ``attn.*`` (see DFAttention), ``mlp.0`` / ``mlp.2`` (Linear
    C -> hidden -> C), ``modulation.1`` (Linear cond_dim -> 6 C, after a SiLU; output chunks in
    the order shift1, scale1, gate1, shift2, scale2, gate2).

    ``forward(x, c, *, cache=None, commit_frames=0, positions=None)``: x ``[B, T, C]``, c
    ``[B, F, cond_dim]`` with ``T % F == 0`` (F = frames of x, T // F normally equal to
    ``frame_size``). With a cache (``block.new_cache()``), x is the frames that follow the
    cached ones; see :class:`KVCache` for the rollout protocol. ``window``
    (``(window_frames, sink_frames)``) overrides the attention's window for this call.
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 cond_dim: int | None = None, mlp_ratio: float = 4.0, frame_size: int = 1,
                 window_frames: int | None = None, sink_frames: int = 0, qk_norm: bool = True,
                 rope_theta: float | None = None, qkv_bias: bool = True, norm: str = "layer", eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        hidden = int(dim * mlp_ratio)
        self.norm, self.eps = norm, eps
        self.attn = DFAttention(dim, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, frame_size=frame_size,
                                window_frames=window_frames, sink_frames=sink_frames, qk_norm=qk_norm,
                                rope_theta=rope_theta, qkv_bias=qkv_bias, norm_eps=eps, **kw)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim, **kw))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim, **kw))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def new_cache(self, capacity_frames: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this block's attention."""
        return self.attn.new_cache(capacity_frames)

    def forward(self, x: Tensor, c: Tensor, *, cache: KVCache | None = None, commit_frames: int = 0,
                positions: Tensor | None = None, window: tuple[int | None, int] | None = None) -> Tensor:
        if c.dim() != 3 or c.shape[0] != x.shape[0]:
            raise ValueError(f"c must be [B, F, cond_dim] with x's B, got {tuple(c.shape)} for x {tuple(x.shape)}")
        # Chunks of the [B, F, 6C] modulation are strided [B, F, C] views: the kernels take them as is.
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, -1)
        h = adaln_modulate(x, shift1, scale1, norm=self.norm, eps=self.eps)
        x = gated_residual(x, self.attn(h, cache=cache, commit_frames=commit_frames, positions=positions,
                                          window=window), gate1)
        h = adaln_modulate(x, shift2, scale2, norm=self.norm, eps=self.eps)
        return gated_residual(x, self.mlp(h), gate2)
