"""benchmarks/: the VAE benchmark's smoke test (`--quick` runs every code path at tiny sizes) and the report helper."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MODELS = ("CustomVAE", "tutorial", "AutoencoderKL")


def _benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its helper `_report` from its own folder
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _write_section():
    return _benchmark_module("_report").write_section


def test_quick_benchmark_writes_its_section_and_keeps_the_others(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\n<!-- trainer:start -->\nthe trainer's numbers\n<!-- trainer:end -->\n")
    command = [sys.executable, str(BENCHMARKS / "benchmark_vae.py"), "--quick", "--output", str(output)]
    # One thread: on a busy machine, two threads wait on each other at every small op (2 min instead of 40 s).
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    text = output.read_text()
    assert "<!-- trainer:start -->\nthe trainer's numbers\n<!-- trainer:end -->" in text
    assert text.count("<!-- benchmark_vae:start -->") == 1 and text.count("<!-- benchmark_vae:end -->") == 1
    section = text.split("<!-- benchmark_vae:start -->")[1].split("<!-- benchmark_vae:end -->")[0]
    assert section.strip() in done.stdout

    header = "| " + " | ".join(MODELS) + " | CustomVAE / AutoencoderKL | CustomVAE / tutorial |"
    assert section.count(header) == 4  # training, inference, large-decode time and memory
    number = r"\d+\.\d+"
    rows = ("16 px | 2", "32 px | 2", "encode | 32 px | 2", "decode | 64 px | 1", "96x96 | untiled")
    for row in rows:  # three models, two ratios
        assert re.search(rf"^\| {re.escape(row)} \|( {number} \|){{5}}$", section, re.MULTILINE), row
    assert re.search(rf"\| 96x96 \| tiled \| {number} \| n/a \(no tiling\) \| {number} \| {number} \| - \|", section)

    targets = re.findall(r"^- \*\*(PASS|FAIL)\*\*: (.*)$", section, re.MULTILINE)
    described = [what for _, what in targets]
    assert len(targets) == 5, targets
    assert [w.startswith("training throughput at") for w in described] == [True, True, False, False, False]
    assert "peak memory under 3 GB" in described[2]
    assert all("decode time per megapixel at 96x96" in w for w in described[3:])
    assert "torch threads: 1" in section


def test_large_decodes_that_would_exhaust_memory_are_skipped_not_run(monkeypatch):
    benchmark = _benchmark_module("benchmark_vae")
    monkeypatch.setattr(benchmark, "available_gb", lambda device: 16.0)
    # No process pool is passed: a case that tried to run would fail.
    skipped = benchmark.large_decode("tutorial", 2048, False, benchmark.FULL, "cpu", processes=None)
    assert skipped == "skipped: needs ~138 GB (16 GB free)"
    assert benchmark.large_decode("tutorial", 2048, True, benchmark.FULL, "cpu", None) == "n/a (no tiling)"
    assert benchmark.estimated_decode_gb("tutorial", 1024, False, benchmark.FULL) == pytest.approx(8.7, abs=0.2)


def test_write_section_creates_replaces_and_appends(tmp_path):
    write_section = _write_section()
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "first", "old")
    write_section(path, "second", "kept\n")
    write_section(path, "first", "new")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "<!-- first:start -->\nnew\n<!-- first:end -->" in text and "old" not in text
    assert text.index("first:end") < text.index("<!-- second:start -->\nkept\n<!-- second:end -->")


@pytest.mark.parametrize("content", ["<!-- vae:start -->\nonly a start", "<!-- vae:end -->\n<!-- vae:start -->"])
def test_write_section_refuses_broken_markers_and_leaves_the_file(tmp_path, content):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(content)
    with pytest.raises(ValueError, match="<!-- vae:start -->"):
        _write_section()(path, "vae", "numbers")
    assert path.read_text() == content


def test_write_section_refuses_a_name_that_cannot_be_a_marker(tmp_path):
    with pytest.raises(ValueError, match="'two words'"):
        _write_section()(tmp_path / "BENCHMARKS.md", "two words", "numbers")


def test_quick_training_benchmark_compares_both_models(tmp_path):
    """benchmarks/benchmark_training.py --quick: both models trained by the trainer, measured, and reported."""
    output = tmp_path / "BENCHMARKS.md"
    image = tmp_path / "comparison.png"
    command = [
        sys.executable,
        str(BENCHMARKS / "benchmark_training.py"),
        "--quick",
        "--output",
        str(output),
        "--image",
        str(image),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    section = (
        output.read_text().split("<!-- benchmark_training:start -->")[1].split("<!-- benchmark_training:end -->")[0]
    )
    number = r"\d+\.\d+"
    for model in ("CustomVAE", "AutoencoderKL"):
        assert re.search(rf"^\| {model} \|( {number} \|){{5}}$", section, re.MULTILINE), model
    assert re.search(r"^\*\*(PASS|FAIL)\*\* \(issue 4\): CustomVAE's held-out PSNR", section, re.MULTILINE)
    assert "2 steps of 2 images at 32x32" in section
    assert "![held-out photos and their reconstructions](comparison.png)" in section
    assert Image.open(image).height > 3 * 200  # the photos, then a row per model
