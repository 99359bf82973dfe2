"""copy.deepcopy and an applied transformer: diffusers' hooks replace forward with a closure
over the original module, so a deep copy would silently run the original's weights; apply
makes deepcopy raise instead, and remove lifts that."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import fastdf.integrations.diffusers as fdd  # noqa: E402

from .test_diffusers import _inputs, _model  # noqa: E402


def test_deepcopy_of_applied_transformer_refused_then_allowed_after_remove():
    model = _model(num_frame_per_block=2)
    kw = _inputs(model, frames=4)
    fdd.apply(model, cache=True)
    with pytest.raises(TypeError, match="deepcopy"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="deepcopy"):
        copy.deepcopy(model.blocks[0])
    with torch.no_grad():
        out = model(**kw)[0]  # the refusal changed nothing
    fdd.remove(model)
    assert all("__deepcopy__" not in m.__dict__ for m in (model, *model.blocks))
    twin = copy.deepcopy(model)
    fdd.apply(twin)
    with torch.no_grad():
        torch.testing.assert_close(twin(**kw)[0], out, rtol=1e-6, atol=1e-6)
        for p in twin.parameters():
            p.mul_(0.5)
        # the copy computes with its own weights (the failure mode the refusal prevents)
        assert not torch.allclose(twin(**kw)[0], out)
