"""Thin nn.Modules over fastdf ops, drop-in replacements for common blocks."""

from .attention import DFAttention, KVCache, apply_rotary, rotary_cos_sin
from .dit import DFBlock

__all__ = ["DFAttention", "DFBlock", "KVCache", "apply_rotary", "rotary_cos_sin"]
