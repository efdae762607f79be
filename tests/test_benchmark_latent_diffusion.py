"""benchmarks/benchmark_latent_diffusion.py (issue 16, item 13): its target, and (slow) its --quick run."""

import math

import pytest

from benchmarks import benchmark_latent_diffusion as benchmark


def test_the_target_is_the_cached_over_encoding_ratio():
    assert benchmark.target({"cached": 30.0, "encoding every batch": 10.0}, 256).met
    missed = benchmark.target({"cached": 29.0, "encoding every batch": 10.0}, 256)
    assert not missed.met and "2.90x" in missed.detail and "256 px" in missed.what
    assert not benchmark.target({"cached": math.nan, "encoding every batch": 10.0}, 256).met


@pytest.mark.slow
def test_quick_run_measures_both_steps_and_writes_its_section(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    results = benchmark.main(["--quick", "--output", str(output)])
    assert set(results) == {"cached", "encoding every batch"}
    assert all(math.isfinite(value) and value > 0 for value in results.values())
    text = output.read_text()
    assert "kept" in text and "<!-- benchmark_latent_diffusion:start -->" in text and "images/s" in text
