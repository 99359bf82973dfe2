"""The "fastdf" HF experts implementation gives eager's outputs and gradients on tiny random
models of every supported family."""

import pytest
import torch

import fastdf
from fastdf.integrations import hf_experts
from tests.hf_tiny import FAMILIES, batch, tiny_model

transformers = pytest.importorskip("transformers")


def _loss_and_grads(model, b, implementation):
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    out = model(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_eager(family):
    model = tiny_model(family)
    b = batch()
    logits, grads = _loss_and_grads(model, b, "eager")
    got_logits, got_grads = _loss_and_grads(model, b, "fastdf")
    torch.testing.assert_close(got_logits, logits, atol=2e-5, rtol=1e-4)
    assert got_grads.keys() == grads.keys()
    experts = [n for n in grads if "gate_up_proj" in n]
    assert experts, "the model has routed experts"
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_triton_backend_matches_eager():
    """The Triton kernels (interpreted here) inside a whole DeepSeek-V2 forward and backward."""
    model = tiny_model("deepseek_v2", seed=1)
    b = batch(lengths=(6, 4))
    logits, grads = _loss_and_grads(model, b, "eager")
    with fastdf.backend("triton"):
        got_logits, got_grads = _loss_and_grads(model, b, "fastdf")
    torch.testing.assert_close(got_logits, logits, atol=2e-5, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_registered_in_experts_interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    assert "fastdf" in ALL_EXPERTS_FUNCTIONS and "fastdf" in ExpertsInterface()
    assert ALL_EXPERTS_FUNCTIONS["fastdf"] is hf_experts.fastdf_experts_forward
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("fastdf")
    assert model.config._experts_implementation == "fastdf"


def test_activation_mapping():
    from transformers.activations import ACT2FN

    cases = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "relu": "relu"}
    for hidden_act, fused in cases.items():
        experts = torch.nn.Module()
        experts.act_fn = ACT2FN[hidden_act]
        assert hf_experts.experts_act(experts) == fused, hidden_act
    experts.act_fn = ACT2FN["mish"]
    assert hf_experts.experts_act(experts) is experts.act_fn  # unfused: applied by torch


def test_unfused_activation_matches_eager():
    model = tiny_model("olmoe", hidden_act="gelu_fast")
    b = batch(lengths=(5, 3))
    logits, grads = _loss_and_grads(model, b, "eager")
    got_logits, got_grads = _loss_and_grads(model, b, "fastdf")
    torch.testing.assert_close(got_logits, logits, atol=2e-5, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_unsupported_layout_is_refused():
    model = tiny_model("mixtral")
    model.set_experts_implementation("fastdf")
    model.model.layers[0].mlp.experts.has_bias = True
    with pytest.raises(NotImplementedError, match="has_bias"):
        model(**batch(lengths=(3,)))
