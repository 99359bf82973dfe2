"""One import registers both HF backends."""

import fastdf.integrations.transformers  # noqa: F401
from transformers import AttentionInterface
from transformers.integrations.moe import ExpertsInterface


def test_one_import_registers_attention_and_experts():
    assert "fastdf" in AttentionInterface._global_mapping
    assert "fastdf" in ExpertsInterface._global_mapping
