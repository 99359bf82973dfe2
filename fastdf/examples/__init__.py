"""Runnable demos: ``python -m fastdf.examples.<name>``.

- ``df_rollout``: train a small :class:`~fastdf.models.DFTransformer` on moving blobs (made in
  code) and roll it out far past its training horizon, with and without the KV cache.
"""
