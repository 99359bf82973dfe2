"""A DiT block with per-frame AdaLN-Zero and frame-causal attention (Diffusion Forcing)."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import _checks
from ..ops.adaln import adaln_modulate, gated_residual
from .attention import MAX_SIZE, DFAttention, KVCache

NORMS = ("layer", "rms")


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
        _checks.number("dim", dim, low=1, high=MAX_SIZE, integer=True)
        if cond_dim is not None:
            _checks.number("cond_dim", cond_dim, low=1, high=MAX_SIZE, integer=True)
        mlp_ratio = _checks.finite_float("mlp_ratio", mlp_ratio, low=0, low_open=True)
        hidden = int(dim * mlp_ratio)
        if not 1 <= hidden <= MAX_SIZE:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an MLP width int(dim * mlp_ratio) = {hidden}; it must lie "
                             f"in 1..{MAX_SIZE}")
        if not isinstance(norm, str):
            raise TypeError(f"norm must be a str (one of {', '.join(NORMS)}), got {type(norm).__name__}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        _checks.finite_float("eps", eps, low=0, low_open=True)
        kw = dict(device=device, dtype=dtype)
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
        """x ``[B, T, C]`` conditioned per frame by c ``[B, F, cond_dim]`` (see the class
        docstring). Arguments are checked before the cache is touched; B, T or F = 0 is a
        ValueError."""
        _checks.tensor("x", x, ndim=3)
        _checks.tensor("c", c, ndim=3)
        if c.shape[0] != x.shape[0] or c.shape[2] != self.modulation[1].in_features:
            raise ValueError(f"c must be [B, F, {self.modulation[1].in_features}] with x's B, got {tuple(c.shape)} "
                             f"for x {tuple(x.shape)}")
        if c.shape[1] == 0 or x.shape[1] % c.shape[1]:
            raise ValueError(f"c must have F >= 1 frames with x's tokens T a multiple of F, got c {tuple(c.shape)} "
                             f"for x {tuple(x.shape)}")
        # The attention's own checks, before the modulation runs, so a bad cache/window/commit
        # raises before anything is computed.
        self.attn._check_call(x, cache, commit_frames, positions, window)
        # Chunks of the [B, F, 6C] modulation are strided [B, F, C] views: the kernels take them as is.
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, -1)
        h = adaln_modulate(x, shift1, scale1, norm=self.norm, eps=self.eps)
        x = gated_residual(x, self.attn(h, cache=cache, commit_frames=commit_frames, positions=positions,
                                          window=window), gate1)
        h = adaln_modulate(x, shift2, scale2, norm=self.norm, eps=self.eps)
        return gated_residual(x, self.mlp(h), gate2)
