"""README's "ESFT end to end" runs as written and does what it says."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippet():
    text = README.read_text()
    section = text.split("### ESFT end to end", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_esft_snippet_runs(capsys):
    scope = {}
    exec(compile(_snippet(), "README.md (ESFT end to end)", "exec"), scope)
    model, base, selection = scope["model"], scope["base"], scope["selection"]
    assert selection and all(ids for ids in selection.values())
    # After load + merge the base model is a plain HF model carrying the trained experts.
    assert not any("esft" in n for n, _ in base.named_parameters())
    merged = dict(base.named_parameters())
    for layer, ids in selection.items():
        experts = model.model.layers[layer].mlp.experts
        for attr, full in (("esft_gate_up", "gate_up_proj"), ("esft_down", "down_proj")):
            w = merged[f"model.layers.{layer}.mlp.experts.{full}"]
            assert torch.equal(w[ids], getattr(experts, attr))
    assert "trained parameters of" in capsys.readouterr().out
