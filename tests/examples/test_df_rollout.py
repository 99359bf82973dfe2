"""The df_rollout demo: its data generator, and the whole script end to end at a tiny size."""

import pytest
import torch

from fastdf.examples import df_rollout


def test_moving_blobs_move_and_stay_in_frame():
    clips = df_rollout.moving_blobs(8, 40, size=16, sigma=1.5, generator=torch.Generator().manual_seed(0))
    assert clips.shape == (8, 40, 1, 16, 16)
    assert clips.min() >= -1 and clips.max() <= 1 and clips.amax((2, 3, 4)).min() > 0.5  # a blob in every frame
    grid = torch.arange(16.0)
    weight = (clips[:, :, 0] + 1) / 2
    cy = (weight.sum(3) * grid).sum(2) / weight.sum((2, 3))
    cx = (weight.sum(2) * grid).sum(2) / weight.sum((2, 3))
    step = torch.stack([cy.diff(dim=1), cx.diff(dim=1)], -1).norm(dim=-1)
    assert step.median() > 0.3 and step.max() < 2.5  # it moves, at about the drawn speed (bounces included)
    assert not torch.equal(clips[0], clips[1])


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "strip.png"
    args = ["--train-steps", "3", "--batch", "4", "--frames", "4", "--size", "8", "--patch", "4", "--dim", "16",
            "--depth", "1", "--heads", "2", "--levels", "100", "--sampling-steps", "3", "--chunk", "2",
            "--context", "1", "--rollout", "16", "--samples", "2", "--context-noise", "10", "--out", str(out),
            "--no-progress"]
    assert df_rollout.main(args) == 0
    text = capsys.readouterr().out
    for policy in ("window", "rolling"):
        assert f"{policy:<7} KV cache :" in text and f"{policy:<7} recompute:" in text
    assert text.count("ms per generated frame") == 4 and text.count("max |cached - recomputed|") == 2
    assert "checks: passed" in text
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_bad_options():
    with pytest.raises(SystemExit):
        df_rollout.parse_args(["--patch", "3"])  # does not divide --size 16
    with pytest.raises(SystemExit):
        df_rollout.parse_args(["--chunk", "9"])  # longer than the window (--frames 8)
