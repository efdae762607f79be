"""Distillation (`--teacher_vae`): a student CustomVAE learns a teacher VAE's latent space, so that a pipeline made
for the teacher gives close images with the student, without a latent-space warning. Tiny teachers are trained or
built here; nothing comes from the Hub."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from test_loading import make_hub_cache
from tiny_pipelines import TINY_AUTOENCODER_KL_CONFIG, TINY_VAE_8X, tiny_autoencoder_kl, tiny_pipeline

from diffusers_custom_vae import CustomVAE, LatentSpaceWarning, swap_vae
from diffusers_custom_vae.latent_spaces import encoder_fingerprint, latent_space_of, shares_latent_space
from diffusers_custom_vae.metrics import psnr
from diffusers_custom_vae.training import TrainConfig, VAEObjective, checkpoint_steps, train
from diffusers_custom_vae.training.checkpoints import STATE_FILE
from diffusers_custom_vae.training.distillation import DistillationObjective

REPO = Path(__file__).resolve().parents[1]
STUDENT = {**TINY_VAE_8X, "block_out_channels": [8, 8, 8, 8]}
TEACHER = TINY_AUTOENCODER_KL_CONFIG


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Smooth 48x48 images (upscaled 6x6 noise, so a tiny VAE learns something in a few steps) and model configs."""
    root = tmp_path_factory.mktemp("distillation")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for index in range(8):
        pixels = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((48, 48), Image.Resampling.BICUBIC).save(root / "images" / f"{index}.png")
    (root / "teacher.json").write_text(json.dumps(TEACHER))
    (root / "student.json").write_text(json.dumps(STUDENT))
    return root


def settings(workdir: Path, output_dir, **fields) -> TrainConfig:
    common = dict(train_data_dir=str(workdir / "images"), resolution=[32], train_batch_size=4, report_to="none")
    common |= dict(validation_steps=1000, learning_rate=3e-3, model_config=str(workdir / "student.json"))
    return TrainConfig(**common | {"output_dir": str(output_dir)} | fields)


@pytest.fixture(scope="module")
def teacher(workdir) -> Path:
    """An AutoencoderKL trained from scratch by the trainer (30 steps): a teacher with an unnamed latent space."""
    train(
        settings(workdir, workdir / "teacher", model_config=str(workdir / "teacher.json"), max_train_steps=30),
        VAEObjective,
    )
    return workdir / "teacher"


@pytest.fixture(scope="module")
def distilled(workdir, teacher):
    """A student distilled from `teacher` for 60 steps, matching the teacher's decode too."""
    config = settings(
        workdir, workdir / "student", teacher_vae=str(teacher), max_train_steps=60, teacher_decode_scale=1
    )
    return SimpleNamespace(folder=workdir / "student", metrics=train(config, DistillationObjective))


def error_of(run_example, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_example("train_vae", argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    return error.rstrip("\n").split("\n")[-1].split("\r")[-1]


def flags(workdir: Path, output_dir, *extra) -> list[str]:
    tiny = ["--train_data_dir", str(workdir / "images"), "--resolution", "32", "--train_batch_size", "4"]
    tiny += ["--report_to", "none", "--max_train_steps", "2", "--model_config", str(workdir / "student.json")]
    return [*tiny, "--output_dir", str(output_dir), *extra]


# ----------------------------------------------------------------------------------------------------- the student


def test_the_saved_student_keeps_the_teachers_factors_and_names_its_space(distilled, teacher):
    student, teacher_vae = CustomVAE.from_pretrained(distilled.folder), AutoencoderKL.from_pretrained(teacher)
    assert student.config.scaling_factor == teacher_vae.config.scaling_factor  # the teacher's, not estimated
    assert student.config.shift_factor == teacher_vae.config.shift_factor
    assert latent_space_of(teacher_vae) is None  # trained from scratch: no name...
    assert student.config.latent_space == encoder_fingerprint(teacher_vae)  # ...so its encoder's fingerprint
    assert shares_latent_space(student, teacher_vae) and not shares_latent_space(student, tiny_autoencoder_kl(0.5))


def test_metrics_json_reports_the_students_fidelity(distilled):
    expected = {"psnr", "ssim", "ms_ssim", "teacher_psnr", "student_vs_teacher_psnr", "teacher_decodes_student_psnr"}
    expected |= {"latent_relative_error", "decode_speedup"}
    metrics = json.loads((distilled.folder / "metrics.json").read_text())
    assert expected <= set(metrics) and all(math.isfinite(metrics[name]) for name in expected)
    assert metrics["student_vs_teacher_psnr"] > metrics["teacher_psnr"]  # it learnt the teacher, more than the images
    assert 0 < metrics["latent_relative_error"] < 1 and metrics["decode_speedup"] > 0
    card = (distilled.folder / "README.md").read_text()
    assert f"Distilled from `{distilled.folder.parent / 'teacher'}`" in card and "the teacher's decode" in card


def test_a_pipeline_made_for_the_teacher_gives_close_images_with_the_student_and_no_warning(distilled, teacher):
    def generate(vae=None, dtype=torch.float32) -> torch.Tensor:
        pipe = tiny_pipeline(vae=AutoencoderKL.from_pretrained(teacher)).to(dtype)
        if vae is not None:
            swap_vae(pipe, vae)
        generator = torch.Generator().manual_seed(0)
        images = pipe("a dog", height=64, width=64, num_inference_steps=2, generator=generator, output_type="pt")
        return images.images.float() * 2 - 1

    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        with_student = generate(CustomVAE.from_pretrained(distilled.folder))
        for dtype in (torch.float16, torch.bfloat16):  # the fingerprint survives the pipeline's half precision
            generate(CustomVAE.from_pretrained(distilled.folder), dtype)
    with pytest.warns(LatentSpaceWarning):
        torch.manual_seed(0)
        with_fresh_student = generate(CustomVAE(**STUDENT))
    with_teacher = generate()
    distilled_psnr, fresh_psnr = psnr(with_student, with_teacher).item(), psnr(with_fresh_student, with_teacher).item()
    assert distilled_psnr > fresh_psnr + 2, (distilled_psnr, fresh_psnr)


@pytest.mark.parametrize(
    "teacher_vae, expected",
    [(tiny_autoencoder_kl(0.18215), "stable-diffusion"), (tiny_autoencoder_kl(0.13025), "stable-diffusion-xl")],
    ids=["SD", "SDXL"],
)
def test_a_student_of_a_known_vae_names_its_space(workdir, tmp_path, teacher_vae, expected):
    teacher_vae.save_pretrained(tmp_path / "teacher")
    train(
        settings(workdir, tmp_path / "student", teacher_vae=str(tmp_path / "teacher"), max_train_steps=1),
        DistillationObjective,
    )
    student = CustomVAE.from_pretrained(tmp_path / "student")
    assert (
        student.config.latent_space == expected and student.config.scaling_factor == teacher_vae.config.scaling_factor
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        swap_vae(tiny_pipeline(vae=teacher_vae), student)


def test_a_custom_vae_teacher_from_the_hub_cache_passes_on_its_name_and_shift(workdir, tmp_path, network_attempts):
    """A CustomVAE teacher, by Hub id from the local cache, offline: its named space and shift factor carry over."""
    torch.manual_seed(1)
    CustomVAE(**STUDENT, scaling_factor=0.3, shift_factor=0.1, latent_space="dogs-v1").save_pretrained(tmp_path / "t")
    cache = make_hub_cache(tmp_path / "cache", tmp_path / "t", "user/dog-vae")
    train(
        settings(workdir, tmp_path / "student", teacher_vae="user/dog-vae", cache_dir=str(cache), max_train_steps=1),
        DistillationObjective,
    )
    config = CustomVAE.from_pretrained(tmp_path / "student").config
    assert (config.latent_space, config.scaling_factor, config.shift_factor) == ("dogs-v1", 0.3, 0.1)


def test_the_vae_inside_a_pipelines_folder_is_a_teacher_by_subfolder(workdir, tmp_path):
    """`--teacher_vae <pipeline> --teacher_vae_subfolder vae`, as for stable-diffusion-v1-5's repo."""
    tiny_pipeline().save_pretrained(tmp_path / "pipe")  # its VAE: a tiny AutoencoderKL with SD's scaling factor
    config = settings(workdir, tmp_path / "student", teacher_vae=str(tmp_path / "pipe"), max_train_steps=1)
    config.teacher_vae_subfolder = "vae"
    train(config, DistillationObjective)
    assert CustomVAE.from_pretrained(tmp_path / "student").config.latent_space == "stable-diffusion"
    assert f"Distilled from `{tmp_path / 'pipe'}/vae`" in (tmp_path / "student" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "student, message",
    [
        (
            {**STUDENT, "latent_channels": 8},
            r"latent channels \(8\).*teacher.*\(4\)",
        ),
        ({**STUDENT, "block_out_channels": [8, 8]}, r"downsampling factor \(2\).*\(8\)"),
        ({**TEACHER}, "student.*CustomVAE.*AutoencoderKL"),
    ],
    ids=["latent channels", "downsampling", "AutoencoderKL student"],
)
def test_a_student_that_cannot_share_the_space_is_refused_before_anything_is_written(
    workdir, teacher, tmp_path, run_example, capsys, student, message
):
    (tmp_path / "student.json").write_text(json.dumps(student))
    argv = flags(
        workdir, tmp_path / "out", "--teacher_vae", str(teacher), "--model_config", str(tmp_path / "student.json")
    )
    assert re.search(message, error_of(run_example, capsys, argv))
    assert not (tmp_path / "out").exists()


def test_decoder_only_distillation_of_an_unaligned_student_is_refused_and_of_a_distilled_one_keeps_its_space(
    workdir, teacher, distilled, tmp_path, run_example, capsys
):
    """A frozen random encoder would encode garbage into a space it claims: refused. A student already distilled
    from the teacher fine-tunes its decoder against it, keeping its space and factors."""
    argv = flags(workdir, tmp_path / "out", "--teacher_vae", str(teacher), "--train_decoder_only")
    error = error_of(run_example, capsys, argv)
    assert "--train_decoder_only" in error and str(teacher) in error
    assert not (tmp_path / "out").exists()

    pretrained = ["--pretrained_model_name_or_path", str(distilled.folder)]
    run_example(
        "train_vae",
        flags(workdir, tmp_path / "decoder", *pretrained, "--teacher_vae", str(teacher), "--train_decoder_only"),
    )
    before, after = CustomVAE.from_pretrained(distilled.folder), CustomVAE.from_pretrained(tmp_path / "decoder")
    assert (
        after.config.latent_space
        == before.config.latent_space
        == encoder_fingerprint(AutoencoderKL.from_pretrained(teacher))
    )
    assert after.config.scaling_factor == before.config.scaling_factor


def test_fine_tuning_a_students_encoder_gives_up_its_teachers_space_and_a_frozen_one_keeps_it(
    workdir, teacher, distilled, tmp_path, run_example
):
    pretrained = ["--pretrained_model_name_or_path", str(distilled.folder)]
    run_example("train_vae", flags(workdir, tmp_path / "whole", *pretrained))
    student, whole = CustomVAE.from_pretrained(distilled.folder), CustomVAE.from_pretrained(tmp_path / "whole")
    assert whole.config.latent_space is None  # its encoder changed: its latents are its own now...
    assert math.isfinite(whole.config.scaling_factor) and whole.config.scaling_factor != student.config.scaling_factor
    pipe = tiny_pipeline(vae=AutoencoderKL.from_pretrained(teacher))
    with pytest.warns(LatentSpaceWarning, match="unnamed"):  # ...and a pipeline of the teacher says so
        swap_vae(pipe, whole)

    run_example("train_vae", flags(workdir, tmp_path / "decoder", *pretrained, "--train_decoder_only"))
    decoder = CustomVAE.from_pretrained(tmp_path / "decoder")
    assert decoder.config.latent_space == student.config.latent_space
    assert decoder.config.scaling_factor == student.config.scaling_factor
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        swap_vae(tiny_pipeline(vae=AutoencoderKL.from_pretrained(teacher)), decoder)


def test_a_teacher_that_is_missing_damaged_or_not_a_vae_is_refused(workdir, teacher, tmp_path, run_example, capsys):
    from diffusers import UNet2DModel

    UNet2DModel(
        block_out_channels=(4, 4),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=2,
        layers_per_block=1,
    ).save_pretrained(tmp_path / "unet")
    AutoencoderKL.from_pretrained(teacher).save_pretrained(tmp_path / "nan")
    weights = tmp_path / "nan" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state["decoder.conv_out.weight"][0] = float("nan")
    save_file(state, weights)
    for teacher_vae, message in (
        (tmp_path / "missing", "missing"),
        (tmp_path / "unet", "UNet2DModel"),
        (tmp_path / "nan", "NaN"),
    ):
        error = error_of(run_example, capsys, flags(workdir, tmp_path / "out", "--teacher_vae", str(teacher_vae)))
        assert str(teacher_vae) in error and message.lower() in error.lower(), error
    error = error_of(run_example, capsys, flags(workdir, tmp_path / "out", "--teacher_vae_subfolder", "vae"))
    assert re.search("--teacher_vae_subfolder.*--teacher_vae", error)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- the teacher in training


def test_the_teacher_is_frozen_unwrapped_and_stays_float32_when_it_asks_to(workdir, teacher):
    objective = DistillationObjective(settings(workdir, workdir / "unused", teacher_vae=str(teacher)))
    assert not objective.teacher.training and not any(p.requires_grad for p in objective.teacher.parameters())
    assert objective.teacher.dtype == torch.float32
    objective.teacher.register_to_config(force_upcast=True)
    fake_accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu"))
    objective.prepare(fake_accelerator, make_optimizer=None)
    dtypes = []
    objective.teacher.encoder.conv_in.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the mixed precision of the student's forward
        _, latents, _ = objective.teacher_targets(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert dtypes == [torch.float32] and latents.dtype == torch.float32


def test_checkpoints_record_the_teacher_and_do_not_hold_it(distilled, teacher):
    (checkpoint,) = (distilled.folder / f"checkpoint-{step}" for step in checkpoint_steps(distilled.folder))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["teacher_vae"] == str(teacher) and len(state["teacher_fingerprint"]) == 16
    modules = sorted(path.name for path in checkpoint.glob("*.safetensors"))
    assert modules == ["model.safetensors"]  # the student only: the teacher is reloaded from where it came from


def test_stop_and_resume_with_a_teacher_ends_with_the_same_weights(
    workdir, teacher, tmp_path, run_example, monkeypatch
):
    common = ["--teacher_vae", str(teacher), "--max_train_steps", "4", "--gradient_accumulation_steps", "2"]
    common += ["--teacher_decode_scale", "0.5", "--disc_scale", "0.5", "--disc_start", "1", "--random_flip"]
    run_example("train_vae", flags(workdir, tmp_path / "straight", *common))
    original_loss, pressed = DistillationObjective.loss, []

    def ctrl_c_during_step_2(self, module, images, step):
        if step == 1 and not pressed:
            pressed.append(os.kill(os.getpid(), signal.SIGINT))
        return original_loss(self, module, images, step)

    monkeypatch.setattr(DistillationObjective, "loss", ctrl_c_during_step_2)
    with pytest.raises(SystemExit):
        run_example("train_vae", flags(workdir, tmp_path / "resumed", *common))
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path / "resumed") == [2]
    run_example("train_vae", flags(workdir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    straight = CustomVAE.from_pretrained(tmp_path / "straight").state_dict()
    resumed = CustomVAE.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_a_resume_needs_the_checkpoints_teacher(workdir, teacher, tmp_path, run_example, capsys, monkeypatch):
    """Refusals name the checkpoint's teacher by where it is, though it was given by a relative path elsewhere."""
    monkeypatch.chdir(teacher.parent)
    run_example("train_vae", flags(workdir, tmp_path / "out", "--teacher_vae", teacher.name))
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    tiny_autoencoder_kl(0.5).save_pretrained(other)
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    error = error_of(run_example, capsys, flags(workdir, tmp_path / "out", "--teacher_vae", str(other), *resume))
    assert str(teacher) in error and str(other) in error
    error = error_of(run_example, capsys, flags(workdir, tmp_path / "out", *resume))
    assert f"--teacher_vae {teacher}" in error


@pytest.mark.slow
def test_two_processes_distil_one_student(workdir, teacher, tmp_path):
    """Two CPU processes (gloo): each holds the teacher unwrapped; the student's replicas stay identical."""
    accelerate = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1".split()
    accelerate += "--mixed_precision no --dynamo_backend no".split()
    argv = flags(
        workdir, tmp_path / "out", "--teacher_vae", str(teacher), "--disc_scale", "0.5", "--train_batch_size", "2"
    )
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *accelerate, str(REPO / "examples" / "train_vae.py"), *argv]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All 2 processes hold identical weights" in result.stdout and result.stdout.count("Saved to") == 1
    assert CustomVAE.from_pretrained(tmp_path / "out").config.latent_space.startswith("encoder-sha256:")
