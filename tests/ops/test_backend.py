"""The backend registry: requests, nesting, environment, availability and clear errors."""

import pytest
import torch

import fastdf
from fastdf.ops import REGISTRY, BackendUnavailableError, requested_backend, unavailable_reason
from fastdf.ops._backend import Op


@pytest.fixture
def toy():
    op = Op("toy_op_for_tests", prefer=("cuda", "triton", "torch"))
    op.register("torch")(lambda x: ("torch", x))
    op.register("triton", supports=lambda x: None if x.numel() < 100 else "too big for the toy")(lambda x: ("triton", x))
    yield op
    del REGISTRY["toy_op_for_tests"]


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTDF_BACKEND", raising=False)
    assert requested_backend() == "auto"


def test_env_variable(monkeypatch):
    monkeypatch.setenv("FASTDF_BACKEND", "Torch")
    assert requested_backend() == "torch"
    monkeypatch.setenv("FASTDF_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDF_BACKEND"):
        requested_backend()


def test_context_nests_and_beats_env(monkeypatch):
    monkeypatch.setenv("FASTDF_BACKEND", "torch")
    with fastdf.backend("triton"):
        assert requested_backend() == "triton"
        with fastdf.backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "triton"
    assert requested_backend() == "torch"


def test_context_restores_after_error():
    with pytest.raises(KeyError):
        with fastdf.backend("torch"):
            raise KeyError
    assert requested_backend() in ("auto", "torch", "triton", "cuda")
    assert fastdf.ops._backend._requests == []


def test_bad_backend_names():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with fastdf.backend("fast"):
            pass
    with pytest.raises(TypeError, match="backend name"):
        with fastdf.backend(3):
            pass


def test_auto_takes_torch_on_cpu(toy):
    with fastdf.backend("auto"):
        assert toy(torch.ones(3))[0] == "torch"


def test_named_backend_runs_it(toy):
    if unavailable_reason("triton", "cpu"):
        pytest.skip("triton cannot run CPU tensors here")
    with fastdf.backend("triton"):
        assert toy(torch.ones(3))[0] == "triton"


def test_named_backend_without_implementation_raises(toy):
    with fastdf.backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="no cuda implementation"):
            toy(torch.ones(3))


def test_named_backend_that_cannot_take_the_inputs_raises(toy):
    if unavailable_reason("triton", "cpu"):
        pytest.skip("triton cannot run CPU tensors here")
    with fastdf.backend("triton"):
        with pytest.raises(BackendUnavailableError, match="too big for the toy"):
            toy(torch.ones(200))


def test_cuda_backend_on_cpu_tensors_names_the_reason():
    with fastdf.backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
            fastdf.merge_attention_states(torch.randn(2, 4), torch.randn(2), torch.randn(2, 4), torch.randn(2))


def test_available_backends_on_cpu():
    names = fastdf.available_backends("cpu")
    assert "torch" in names and "cuda" not in names


def test_every_registered_op_has_a_torch_reference():
    for name, op in REGISTRY.items():
        assert "torch" in op.backends, f"fastdf.{name} has no torch reference"


@pytest.mark.parametrize("call,match", [
    (lambda: fastdf.grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([1.0, 4.0])), "offs"),
    (lambda: fastdf.moe_experts(torch.randn(2, 4), torch.tensor([[0.0], [1.0]]), torch.ones(2, 1),
                                torch.randn(2, 6, 4), torch.randn(2, 4, 3)), "topk_ids"),
    (lambda: fastdf.sample(torch.randn(2, 5), temperature=float("nan")), "temperature"),
    (lambda: fastdf.adaln_modulate(torch.randn(1, 2, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4), eps=1e300), "eps"),
])
def test_bad_input_is_refused_before_a_backend_is_chosen(call, match):
    """Argument checks run before dispatch: a bad call names its argument even when the
    requested backend could not run here (no BackendUnavailableError hides it)."""
    with fastdf.backend("cuda"), pytest.raises(ValueError, match=match):
        call()
