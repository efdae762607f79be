"""benchmarks/benchmark_latent_diffusion.py (issue 16, item 13): its target, bad flags, (slow) a --quick run."""

import json
import math

import pytest

from benchmarks import benchmark_latent_diffusion as benchmark
from benchmarks import render


def test_the_target_is_the_cached_over_encoding_ratio():
    assert benchmark.target({"cached": 30.0, "encoding every batch": 10.0}, 256).met
    missed = benchmark.target({"cached": 29.0, "encoding every batch": 10.0}, 256)
    assert not missed.met and "2.90x" in missed.detail and "256 px" in missed.what
    assert not benchmark.target({"cached": math.nan, "encoding every batch": 10.0}, 256).met


def test_bad_config_fields_are_one_line_naming_them(capsys):
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--quick", "--diffusion_config", '{"vae": "x", "no_such_field": 1}'])
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "--diffusion_config" in message and "no_such_field" in message and "vae" in message


@pytest.mark.slow
def test_quick_run_measures_both_parts_and_renders_its_section(tmp_path):
    results, output, image = tmp_path / "results", tmp_path / "BENCHMARKS.md", tmp_path / "samples.png"
    data = benchmark.main(["--quick", "--results", str(results), "--output", str(output), "--image", str(image)])
    speeds = data["throughput"]["images_per_second"]
    assert set(speeds) == {"cached", "encoding every batch"}
    assert all(math.isfinite(value) and value > 0 for value in speeds.values())
    assert set(data["dits"]) == set(data["vaes"]) == {"CustomVAE", "AutoencoderKL"}
    for dit in data["dits"].values():
        assert math.isfinite(dit["held_out_loss"]) and dit["held_out_loss"] > 0 and dit["latent_std"] > 0
        assert dit["fid"] is not None or "skipped" in dit["fid_note"]
    assert json.loads((results / "benchmark_latent_diffusion.json").read_text())["dits"] == data["dits"]
    text = output.read_text()
    assert "Equal-budget DiTs" in text and "held-out denoising loss" in text and "images/s" in text
    assert "(samples.png)" in text.replace("../", "") and image.stat().st_size > 0
    assert text == render.render(results, output)
