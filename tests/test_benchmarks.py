"""benchmarks/: how they measure, the targets they check, the section they write, and (marked slow) each `--quick`
run, which goes through every code path at tiny sizes."""

import json
import math
import time

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from benchmarks import benchmark_distillation, benchmark_training, benchmark_vae, render
from benchmarks.measure import PeakMemory, interleaved_times
from benchmarks.models import CUSTOM_VAE_WIDTHS, STABLE_DIFFUSION_WIDTHS, autoencoder_kl
from benchmarks.report import Target
from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.evaluation import common_crop
from diffusers_custom_vae.modeling_custom_vae import downsample_factor_of
from diffusers_custom_vae.presets import PRESETS

MODELS = ("CustomVAE", "tutorial", "AutoencoderKL")
QUICK = benchmark_vae.QUICK


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_interleaved_times_take_turns_and_time_each_call():
    order = []
    calls = {
        "short": lambda: order.append("short"),
        "long": lambda: (order.append("long"), time.sleep(0.05)),
    }
    times = interleaved_times(calls, rounds=2, min_run_time=0)
    # Each turn: one warm-up call and one timed call; the two take turns round by round.
    assert order == ["short", "short", "long", "long"] * 2
    assert len(times["short"].times) == len(times["long"].times) == 2
    assert times["long"].median >= 0.05 > times["short"].median > 0


def test_peak_memory_sees_an_allocation_and_not_what_was_there_before():
    with PeakMemory("cpu") as memory:
        block = torch.ones(25_000_000)  # 0.1 GB, written: resident
        del block
    assert math.isfinite(memory.peak_gb) and 0.099 <= memory.peak_gb < 0.5
    assert memory.baseline_gb > 0
    with PeakMemory("cpu") as nothing:
        pass
    assert 0 <= nothing.peak_gb < 0.099  # the earlier peak was reset


def test_a_large_decode_is_timed_and_its_memory_measured_in_this_process():
    measured = benchmark_vae.measure_large_decode("CustomVAE", 32, False, QUICK, "cpu")
    assert _finite_positive(measured["seconds"]) and _finite_positive(measured["baseline_gb"])
    assert math.isfinite(measured["peak_gb"]) and measured["peak_gb"] >= 0


def test_large_decodes_that_would_exhaust_memory_are_skipped_not_run(monkeypatch):
    monkeypatch.setattr(benchmark_vae, "available_gb", lambda device: 16.0)
    # No process pool is passed: a case that tried to run would fail.
    skipped = benchmark_vae.large_decode("tutorial", 2048, False, benchmark_vae.FULL, "cpu", processes=None)
    assert skipped.startswith("skipped") and "138 GB" in skipped and "16 GB free" in skipped
    assert "no tiling" in benchmark_vae.large_decode("tutorial", 2048, True, benchmark_vae.FULL, "cpu", None)
    assert benchmark_vae.estimated_decode_gb("tutorial", 1024, False, benchmark_vae.FULL) == pytest.approx(
        8.7, abs=0.2
    )


def _results(custom_vae_images_per_second: float, large_decode: dict | str) -> dict:
    """Results as `benchmark_vae.run` returns them for QUICK, with CustomVAE's numbers chosen by the test."""
    others = {"tutorial": 10.0, "AutoencoderKL": 10.0}
    speeds = {"CustomVAE": custom_vae_images_per_second, **others}
    return {
        "train": {resolution: dict(speeds) for resolution in benchmark_vae.QUICK.train},
        "encode": {resolution: dict(speeds) for resolution in benchmark_vae.QUICK.inference},
        "decode": {resolution: dict(speeds) for resolution in benchmark_vae.QUICK.inference},
        "large": {96: {tiling: {"CustomVAE": large_decode} for tiling in ("untiled", "tiled")}},
    }


def test_vae_targets_are_met_or_missed_by_the_numbers():
    # Decoding 12 images/s at 64x64 is 20.3 s per megapixel; one 96x96 image in 0.02 s is 2.2 s/MP: 0.11x.
    met = benchmark_vae.targets(_results(12.0, {"seconds": 0.02, "peak_gb": 0.5, "baseline_gb": 0.4}), QUICK)
    assert [target.met for target in met] == [True] * 5
    assert [target.measured for target in met[:2]] == [pytest.approx(1.2)] * 2  # CustomVAE / AutoencoderKL
    assert met[2].measured == 0.5
    assert met[3].measured == met[4].measured == pytest.approx((0.02 * 1e6 / 96**2) / (1e6 / (12 * 64**2)))

    missed = benchmark_vae.targets(_results(8.0, {"seconds": 1.0, "peak_gb": 3.5, "baseline_gb": 0.4}), QUICK)
    assert [target.met for target in missed] == [False] * 5
    assert all(math.isfinite(target.measured) for target in missed)

    skipped = benchmark_vae.targets(_results(12.0, "skipped: needs ~9 GB (4 GB free)"), QUICK)
    assert [target.met for target in skipped] == [True, True, False, False, False]
    assert all(target.detail == "skipped: needs ~9 GB (4 GB free)" for target in skipped[2:])


def test_a_target_is_missed_when_its_number_is_nan():
    assert not Target("x", math.nan, 1.0, at_least=True, detail="").met
    assert not Target("x", math.nan, 1.0, at_least=False, detail="").met
    assert Target("x", 1.0, 1.0, at_least=False, detail="").met and Target("x", 1.0, 1.0, True, "").met


def test_the_autoencoder_kl_compared_has_custom_vaes_widths_or_stable_diffusions_architecture():
    custom, theirs = CustomVAE().config, autoencoder_kl().config
    assert tuple(theirs.block_out_channels) == CUSTOM_VAE_WIDTHS == tuple(custom.block_out_channels)
    assert theirs.latent_channels == custom.latent_channels and theirs.layers_per_block == custom.layers_per_block
    assert downsample_factor_of(theirs) == downsample_factor_of(custom) == benchmark_vae.DOWNSAMPLING
    with torch.device("meta"):  # the shapes only: no memory, no time
        stable_diffusion = autoencoder_kl(STABLE_DIFFUSION_WIDTHS)
    # The parameter count of stabilityai/sd-vae-ft-mse (and of SD 1.x/2.x's VAE): the same architecture.
    assert sum(p.numel() for p in stable_diffusion.parameters()) == 83_653_863


def test_benchmarks_md_is_what_the_renderer_makes_of_the_committed_results():
    assert (render.REPO / "BENCHMARKS.md").read_text() == render.render(render.RESULTS, render.OUTPUT)
    for path in render.RESULTS.glob("*.json"):
        image = json.loads(path.read_text()).get("image")
        assert image is None or (path.parent / image).is_file(), image


def test_results_without_a_section_are_refused_by_name(tmp_path):
    (tmp_path / "benchmark_new.json").write_text("{}")
    with pytest.raises(ValueError, match="benchmark_new"):
        render.render(tmp_path, tmp_path / "BENCHMARKS.md")


def test_publish_saves_the_results_and_renders_every_section(tmp_path, capsys):
    results, output = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    data = json.loads((render.RESULTS / "benchmark_training.json").read_text())
    data["models"]["CustomVAE"]["psnr"] = 99.0
    render.publish("benchmark_training", data, results, output)
    assert json.loads((results / "benchmark_training.json").read_text()) == data
    text = output.read_text()
    assert text == render.render(results, output) and "| CustomVAE | 99.00 |" in text
    assert (
        "| CustomVAE | 99.00 |" in capsys.readouterr().out
    )  # printed first: a file that can't be written loses nothing


def test_both_trained_models_get_the_same_budget_and_their_own_folder(tmp_path):
    configs = benchmark_training.train_configs({"resolution": 32, "max_train_steps": 3}, tmp_path)
    assert list(configs) == ["CustomVAE", "AutoencoderKL"]
    ours, theirs = configs["CustomVAE"], configs["AutoencoderKL"]
    assert ours.resolution == theirs.resolution == [32, 32] and ours.max_train_steps == theirs.max_train_steps == 3
    differing = {name for name, value in vars(ours).items() if vars(theirs)[name] != value}
    assert differing == {"output_dir", "model_config"} and ours.model_config is None
    assert {ours.report_to, theirs.report_to} == {"none"}
    with open(theirs.model_config) as file:
        model_config = json.load(file)
    assert model_config["_class_name"] == AutoencoderKL.__name__
    assert tuple(model_config["block_out_channels"]) == CUSTOM_VAE_WIDTHS


@pytest.mark.parametrize(
    ("train_config", "nouns"),
    [
        ('{"output_dir": "x"}', ["output_dir", "TrainConfig fields"]),
        ('{"resolutoin": 64}', ["resolutoin", "TrainConfig fields"]),
        ("[64]", ["JSON object", "[64]"]),
        ('{"resolution": 0}', ["resolution", "positive integers"]),
        ('{"learning_rate": -1}', ["learning_rate", "positive number", "-1"]),
    ],
)
def test_the_training_benchmark_refuses_a_bad_train_config_before_training(tmp_path, capsys, train_config, nouns):
    with pytest.raises(SystemExit):
        benchmark_training.main(
            [
                "--train_config",
                train_config,
                "--results",
                str(tmp_path / "results"),
                "--output",
                str(tmp_path / "B.md"),
            ]
        )
    error = capsys.readouterr().err
    assert all(noun in error for noun in nouns), error
    assert list(tmp_path.iterdir()) == []


def test_the_training_target_is_met_when_custom_vae_reconstructs_at_least_as_well():
    results = lambda ours, theirs: {"CustomVAE": {"psnr": ours}, "AutoencoderKL": {"psnr": theirs}}
    assert benchmark_training.target(results(18.2, 16.7)).met
    assert benchmark_training.target(results(16.7, 16.7)).met
    assert not benchmark_training.target(results(16.6, 16.7)).met
    assert not benchmark_training.target(results(math.nan, 16.7)).met


@pytest.mark.slow
def test_quick_vae_benchmark_measures_every_case_saves_its_results_and_renders_them(tmp_path, capsys):
    output, saved = tmp_path / "BENCHMARKS.md", tmp_path / "results"
    saved.mkdir()
    (saved / "benchmark_training.json").write_text((render.RESULTS / "benchmark_training.json").read_text())
    results = benchmark_vae.main(["--quick", "--results", str(saved), "--output", str(output)])

    plan = QUICK
    for table, cases in [("train", plan.train), ("encode", plan.inference), ("decode", plan.inference)]:
        assert list(results[table]) == list(cases)
        assert all(_finite_positive(results[table][key][model]) for key in cases for model in MODELS), table
    assert list(results["large"]) == list(plan.large_decode)
    for cases in results["large"].values():
        assert list(cases) == ["untiled", "tiled"]
        for tiling, case in cases.items():
            for model in MODELS:
                if model == "tutorial" and tiling == "tiled":
                    assert "no tiling" in case[model]
                    continue
                assert _finite_positive(case[model]["seconds"]) and _finite_positive(case[model]["baseline_gb"])
                assert math.isfinite(case[model]["peak_gb"]) and case[model]["peak_gb"] >= 0

    targets = benchmark_vae.targets(results, plan)
    assert len(targets) == 5 and all(math.isfinite(target.measured) for target in targets)
    for target, resolution in zip(targets, plan.train):
        speeds = results["train"][resolution]
        assert target.measured == speeds["CustomVAE"] / speeds["AutoencoderKL"]
        assert target.met == (speeds["CustomVAE"] >= speeds["AutoencoderKL"])

    data = json.loads((saved / "benchmark_vae.json").read_text())
    assert [target["detail"] for target in data["targets"]] == [target.detail for target in targets]
    text = output.read_text()
    assert text == render.render(saved, output) and "## The main job" in text  # the other results kept
    section = "\n".join(render.vae_section(data))
    assert section in text and section in capsys.readouterr().out
    assert "torch threads: 1" in section and "`python -m benchmarks.benchmark_vae --quick --results" in section


@pytest.mark.slow
def test_quick_training_benchmark_trains_and_compares_both_models(tmp_path):
    output, image, saved = tmp_path / "BENCHMARKS.md", tmp_path / "comparison.png", tmp_path / "results"
    results = benchmark_training.main(
        ["--quick", "--results", str(saved), "--output", str(output), "--image", str(image)]
    )

    assert list(results) == ["CustomVAE", "AutoencoderKL"]
    for result in results.values():
        assert result["train_steps"] == 2 and _finite_positive(result["train_images_per_second"])
        assert all(math.isfinite(result[metric]) for metric in ("psnr", "ssim", "ms_ssim"))
    side = common_crop(load_data().test).shape[-1]
    assert Image.open(image).height == 3 * (side + 2) + 2  # the photos, then a row per model
    assert json.loads((saved / "benchmark_training.json").read_text())["models"] == results
    text = output.read_text()
    assert benchmark_training.target(results).markdown() in text
    assert "![held-out photos and their reconstructions](comparison.png)" in text


# benchmark_distillation

# 8x downsampling like every model of the distillation benchmark, and the fewest channels that still have every block.
EIGHT_X_TINY = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, num_attention_heads=2)


def test_every_distillation_training_gets_the_same_budget_and_the_students_distil_the_teacher(tmp_path):
    configs = benchmark_distillation.train_configs(
        {"resolution": 32, "max_train_steps": 3}, tmp_path, None, ["default", "small"]
    )
    assert list(configs) == ["teacher", "default", "small"]
    teacher, default, small = configs.values()
    with open(teacher.model_config) as file:
        model_config = json.load(file)
    assert model_config["_class_name"] == AutoencoderKL.__name__
    assert tuple(model_config["block_out_channels"]) == CUSTOM_VAE_WIDTHS and teacher.teacher_vae is None
    assert default.teacher_vae == small.teacher_vae == teacher.output_dir
    assert (default.model_config, small.model_config) == (None, "small") and "small" in PRESETS
    for student in (default, small):
        differing = {name for name, value in vars(student).items() if vars(teacher)[name] != value}
        assert differing == {"output_dir", "model_config", "teacher_vae"}
        assert student.resolution == [32, 32] and student.max_train_steps == 3 and student.report_to == "none"
    assert len({config.output_dir for config in configs.values()}) == 3

    given = benchmark_distillation.train_configs({}, tmp_path / "given", "my-teacher", ["small"])
    assert list(given) == ["small"] and given["small"].teacher_vae == "my-teacher"
    assert not (tmp_path / "given").exists()  # no teacher config written when the teacher is given


def _distillation_results(student_psnr, teacher_decodes_student_psnr, seconds) -> dict:
    """Results as `benchmark_distillation.run` returns them, as far as the targets read them: a teacher at 15 dB."""
    metrics = {
        "teacher_psnr": 15.0,
        "psnr": student_psnr,
        "teacher_decodes_student_psnr": teacher_decodes_student_psnr,
    }
    return {
        "students": {name: dict(metrics) for name in seconds},
        "decode_seconds": {**seconds, "teacher": 1.0, benchmark_distillation.SD: 10.0},
    }


def test_distillation_targets_are_met_or_missed_by_the_numbers():
    plan = benchmark_distillation.FULL
    met = benchmark_distillation.targets(_distillation_results(14.5, 14.0, {"default": 1.25, "small": 1.0}), plan)
    assert [target.met for target in met] == [True] * 5  # 0.5 and 1.0 dB below the teacher: just within
    assert [target.measured for target in met[:2]] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert met[4].measured == pytest.approx(10.0)  # the faster student counts: 8x and 10x
    assert "512x512" in met[4].what and "default 8.0x" in met[4].detail and "small 10.0x" in met[4].detail

    missed = benchmark_distillation.targets(_distillation_results(14.4, 13.9, {"default": 1.25, "small": 1.2}), plan)
    assert [target.met for target in missed] == [False] * 5
    nan = benchmark_distillation.targets(_distillation_results(math.nan, math.nan, {"default": math.nan}), plan)
    assert len(nan) == 3 and not any(target.met for target in nan)
    better = benchmark_distillation.targets(_distillation_results(16.0, 15.5, {"small": 0.5}), plan)
    assert [target.met for target in better] == [True] * 3  # a student may beat its teacher


def test_a_distillation_decode_is_timed_and_its_memory_measured_in_this_process(tmp_path):
    torch.manual_seed(0)
    CustomVAE(**EIGHT_X_TINY).save_pretrained(tmp_path)
    decoder = benchmark_distillation.Decoder(str(tmp_path), EIGHT_X_TINY["block_out_channels"])
    measured = benchmark_distillation.measure_large_decode(decoder, side=32, warmup_side=16, device="cpu")
    assert _finite_positive(measured["seconds"]) and _finite_positive(measured["baseline_gb"])
    assert math.isfinite(measured["peak_gb"]) and measured["peak_gb"] >= 0


def test_distillation_decoders_take_turns_each_with_its_own_latents():
    torch.manual_seed(0)
    vaes = {"student": CustomVAE(**EIGHT_X_TINY).eval(), "teacher": AutoencoderKL(**EIGHT_X_TINY_KL).eval()}
    seconds = benchmark_distillation.decode_seconds(vaes, 32, benchmark_distillation.QUICK, "cpu")
    assert list(seconds) == ["student", "teacher"] and all(_finite_positive(s) for s in seconds.values())


EIGHT_X_TINY_KL = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
)


def test_large_distillation_decodes_that_would_exhaust_memory_are_skipped_not_run(monkeypatch):
    monkeypatch.setattr(benchmark_distillation, "available_gb", lambda device: 4.0)
    sd = benchmark_distillation.Decoder(None, STABLE_DIFFUSION_WIDTHS)
    # No process pool is passed: a case that tried to run would fail.
    skipped = benchmark_distillation.large_decode(sd, 1024, benchmark_distillation.FULL, "cpu", processes=None)
    # six 256-channel float32 activations at 1024x1024
    assert skipped.startswith("skipped") and "6 GB" in skipped and "4 GB free" in skipped


def test_distillation_decoder_parameters_are_those_of_the_decoding_side():
    with torch.device("meta"):  # the shapes only
        stable_diffusion = autoencoder_kl(STABLE_DIFFUSION_WIDTHS)
    # SD's VAE: 49.49 M parameters decode (decoder and post_quant_conv), 34.16 M encode (encoder and quant_conv).
    assert benchmark_distillation.decoder_parameters(stable_diffusion) == 49_490_199
    small = benchmark_distillation.decoder_parameters(CustomVAE(**PRESETS["small"]))
    assert small == sum(p.numel() for p in CustomVAE(**PRESETS["small"]).decoder.parameters())


@pytest.mark.parametrize(
    ("arguments", "nouns"),
    [
        (["--teacher", "no/such/folder"], ["--teacher", "no/such/folder"]),
        (["--train_config", '{"teacher_vae": "x"}'], ["teacher_vae", "TrainConfig fields"]),
        (["--train_config", '{"resolution": 0}'], ["resolution", "positive integers"]),
        (["--students", "large"], ["--students", "large"]),
    ],
)
def test_the_distillation_benchmark_refuses_bad_arguments_before_training(tmp_path, capsys, arguments, nouns):
    with pytest.raises(SystemExit):
        benchmark_distillation.main(
            [
                *arguments,
                "--results",
                str(tmp_path / "r"),
                "--output",
                str(tmp_path / "B.md"),
                "--image",
                str(tmp_path / "i.png"),
            ]
        )
    error = capsys.readouterr().err
    assert all(noun in error for noun in nouns), error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_quick_distillation_benchmark_trains_measures_and_writes_its_section(tmp_path, capsys):
    output, image, saved = tmp_path / "BENCHMARKS.md", tmp_path / "decodes.png", tmp_path / "results"
    results = benchmark_distillation.main(
        ["--quick", "--results", str(saved), "--output", str(output), "--image", str(image)]
    )

    assert results["teacher"]["train_steps"] == 2 and math.isfinite(results["teacher"]["psnr"])
    assert list(results["students"]) == ["default", "small"]
    for metrics in results["students"].values():
        assert metrics["train_steps"] == 2
        for name in ("psnr", "teacher_psnr", "student_vs_teacher_psnr", "teacher_decodes_student_psnr"):
            assert math.isfinite(metrics[name]), name
        assert _finite_positive(metrics["latent_relative_error"])
    names = ["teacher", "default", "small", benchmark_distillation.SD]
    assert list(results["decode_seconds"]) == names
    assert all(_finite_positive(seconds) for seconds in results["decode_seconds"].values())
    assert list(results["large"]) == list(benchmark_distillation.QUICK.large_sides)
    for cases in results["large"].values():
        assert list(cases) == names
        for case in cases.values():
            assert _finite_positive(case["seconds"]) and _finite_positive(case["baseline_gb"])
            assert math.isfinite(case["peak_gb"]) and case["peak_gb"] >= 0
    parameters = results["parameters"]
    assert parameters[benchmark_distillation.SD] > parameters["teacher"] > parameters["default"] > parameters["small"]

    targets = benchmark_distillation.targets(results, benchmark_distillation.QUICK)
    assert len(targets) == 5 and all(math.isfinite(target.measured) for target in targets)
    side = common_crop(load_data().test).shape[-1]
    assert Image.open(image).height == 4 * (side + 2) + 2  # the photos, the teacher, each student
    data = json.loads((saved / "benchmark_distillation.json").read_text())
    section = "\n".join(render.distillation_section(data | {"image_link": "decodes.png"}))
    assert section in output.read_text() and section in capsys.readouterr().out
    assert all(target.markdown() in section for target in targets)
    assert "![held-out photos, the teacher's and the students' decodes](decodes.png)" in section
