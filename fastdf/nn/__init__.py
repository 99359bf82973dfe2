"""Thin nn.Modules over fastdf ops, drop-in replacements for common blocks."""
