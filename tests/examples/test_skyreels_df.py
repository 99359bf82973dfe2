"""The skyreels_df example end to end at a tiny size: stock vs fastdf vs fastdf+cache."""

import pytest

pytest.importorskip("diffusers")

from fastdf.examples import skyreels_df  # noqa: E402


def test_example_runs_and_matches_stock(tmp_path, capsys, monkeypatch):
    out = tmp_path / "strip.png"
    args = ["--frames", "17", "--steps", "3", "--ar-step", "2", "--block", "2", "--size", "16", "--out", str(out)]
    seen = []
    run = skyreels_df.run
    monkeypatch.setattr(skyreels_df, "run", lambda a: seen.append(run(a)) or seen[-1])  # main's numbers, one run
    assert skyreels_df.main(args) == 0
    (results,) = seen
    for name in ("fastdf", "fastdf cache"):
        # fp32 reassociation only; see the 2x-torch-error integration tests
        assert results[name]["max_diff"] <= skyreels_df.TOLERANCE
    assert 0 < results["fastdf cache"]["skipped"] < 1  # async: finished blocks are reused
    assert all(results[n]["seconds"] > 0 and results[n]["peak_mib"] is None for n in ("stock", "fastdf"))
    text = capsys.readouterr().out
    assert "cache skipped" in text and "n/a (CPU)" in text
    from PIL import Image

    with Image.open(out) as img:  # 17 frames of 16 px side, upscaled 4x, in one row
        assert img.size == (17 * 16 * 4, 16 * 4)


def test_bad_arguments_rejected():
    for bad in (["--frames", "8"], ["--ar-step", "-1"], ["--ar-step", "2", "--block", "1"], ["--size", "20"]):
        with pytest.raises(SystemExit):
            skyreels_df.parse_args(bad)
