"""The trainer as `examples/train_vae.py` runs it: its command line, the loop's guarantees (exact resume, stops,
non-finite losses, seeds) and the output folder. Runs use a tiny 8x config on a folder of small images and take a
second or two; longer end-to-end runs (several processes, bf16, the embedded photos) are marked slow."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from accelerate.utils import DistributedType
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from tiny_pipelines import TINY_AUTOENCODER_KL_CONFIG

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.training import TrainConfig, VAEObjective, checkpoint_steps, train
from diffusers_custom_vae.training.trainer import StopRequest, refuse_unaware_copies

REPO = Path(__file__).resolve().parents[1]
# 8x downsampling like the default model, so whole held-out images give few attention tokens.
TINY_8X = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_attention_heads": 2}


def finite_and_not(value: float, other: float) -> bool:
    """`value != other` that fails on NaN, which compares unequal to everything."""
    return math.isfinite(value) and value != other


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY_8X))
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Nested class folders of small images in every format and mode, plus a corrupt and a truncated file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(12):
        image = Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))
        folder = root / ("dogs" if index % 2 else "cats/nested")
        folder.mkdir(parents=True, exist_ok=True)
        kind = index % 6
        if kind == 0:
            image.save(folder / f"{index}.jpg")
        elif kind == 1:
            image.convert("L").save(folder / f"{index}.PNG")
        elif kind == 2:
            image.convert("P").save(folder / f"{index}.png")
        elif kind == 3:
            image.convert("RGBA").save(folder / f"{index}.webp")
        elif kind == 4:
            image.save(folder / f"{index}.bmp")
        else:
            image.putalpha(128)
            image.save(folder / f"{index}.png")
    (root / "dogs" / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / "whole.jpg")
    (root / "dogs" / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:300])
    return root


@pytest.fixture
def flags(model_config, image_folder):
    """flags(output_dir, *extra): a tiny, fast run on the image folder: 32 px, batches of 2, 3 steps, no tracker."""

    def make(output_dir, *extra) -> list[str]:
        tiny = "--resolution 32 --train_batch_size 2 --max_train_steps 3 --report_to none".split()
        data = ["--train_data_dir", str(image_folder)]
        return ["--model_config", model_config, "--output_dir", str(output_dir), *data, *tiny, *extra]

    return make


def load_weights(folder) -> dict[str, torch.Tensor]:
    return CustomVAE.from_pretrained(folder).state_dict()


# ------------------------------------------------------------------------------------------------ the command line


def test_flags_are_the_config_fields(run_example, load_example):
    parse = load_example("train_vae").parse_config
    config = parse("--resolution 64 96 --random_flip --kl_scale 1e-4 --max_train_steps 7".split())
    assert config == TrainConfig(resolution=[64, 96], random_flip=True, kl_scale=1e-4, max_train_steps=7)
    assert parse(["--resolution", "64"]).resolution == [64, 64]


def test_config_settings_keep_their_names_down_to_the_loss_and_the_data():
    from diffusers_custom_vae.data import load_data
    from diffusers_custom_vae.losses import VAELoss

    config = TrainConfig(rec_loss="l2", kl_scale=1e-4, disc_start=5, resolution=[32], random_flip=True)
    assert config.arguments_for(VAELoss) == {
        "rec_loss": "l2",
        "kl_scale": 1e-4,
        "kl_warmup_steps": 0,
        "ms_ssim_scale": 0.0,
        "perceptual_scale": 0.0,
        "disc_scale": 0.0,
        "disc_start": 5,
    }
    assert config.arguments_for(load_data)["resolution"] == [32, 32]
    assert config.arguments_for(load_data)["random_flip"] is True


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--resolution", "30"], r"resolution.*8.*\[30, 30\]"),
        (["--resolution", "0"], "positive integers"),
        (["--train_data_dir", "a", "--dataset_name", "b"], "not both"),
        (["--streaming", "--dataset_name", "b"], "--streaming.*--max_train_steps"),
        (["--rec_loss", "l3"], "l1 or l2"),
        (["--train_batch_size", "0"], "--train_batch_size.*1"),
        (["--train_data_dir", "no-such-folder"], "no-such-folder"),
        (["--model_config", "no-such.json"], "--model_config 'no-such.json'"),
        (["--max_train_steps", "0"], "--max_train_steps.*1.*got 0"),
        (["--max_train_steps", "-2"], "--max_train_steps.*1.*got -2"),
        (["--num_train_epochs", "0"], "--num_train_epochs.*1.*got 0"),
        (["--learning_rate", "nan"], "--learning_rate.*positive.*nan"),
        (["--lr_scheduler", "cosin"], "--lr_scheduler.*cosine.*'cosin'"),
        (["--ema_decay", "1.5"], r"--ema_decay.*\[0, 1\].*1.5"),
        (["--kl_scale", "-1"], "--kl_scale.*0.0.*-1.0"),
    ],
)
def test_a_users_mistake_is_one_line_and_writes_nothing(bad, message, run_example, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_example("train_vae", ["--output_dir", str(tmp_path / "out"), "--report_to", "none", *bad])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.startswith("train_vae.py: error: ") and error.count("\n") == 1, error
    assert "Traceback" not in error
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_the_resolution_must_fit_the_models_downsampling(flags, tmp_path, run_example, capsys):
    sixteen_x = tmp_path / "16x.json"
    sixteen_x.write_text(json.dumps({**TINY_8X, "block_out_channels": [8, 8, 8, 16, 16]}))
    with pytest.raises(SystemExit):
        run_example("train_vae", [*flags(tmp_path / "out"), "--model_config", str(sixteen_x), "--resolution", "24"])
    assert re.search("resolution.*16", capsys.readouterr().err)

    two_x = tmp_path / "2x.json"
    two_x.write_text(json.dumps({**TINY_8X, "block_out_channels": [8, 16]}))
    metrics = run_example("train_vae", [*flags(tmp_path / "2x"), "--model_config", str(two_x), "--resolution", "18"])
    assert metrics["train_steps"] == 3  # 18 px are 9 latents of a 2x model


@pytest.mark.parametrize(
    "content, message",
    [
        ("[8, 16]", "JSON object.*list"),
        (
            '{"block_out_channel": [8, 16]}',
            "CustomVAE.*block_out_channel",
        ),
        ('{"_class_name": "UNet2DModel"}', "UNet2DModel"),
        ("{not json", "Cannot read --model_config"),
    ],
)
def test_a_model_config_must_be_an_object_of_known_keys(flags, tmp_path, run_example, capsys, content, message):
    (tmp_path / "model.json").write_text(content)
    with pytest.raises(SystemExit):
        run_example("train_vae", [*flags(tmp_path / "out"), "--model_config", str(tmp_path / "model.json")])
    error = capsys.readouterr().err
    assert re.search(message, error) and "Traceback" not in error, error
    assert not (tmp_path / "out").exists()


def test_unaware_copies_are_refused(monkeypatch):
    """torchrun without the CPU switch starts processes that each think they are alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes.*1.*ACCELERATE_USE_CPU=1"):
        refuse_unaware_copies(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))


def test_sharded_set_ups_are_refused():
    """FSDP and DeepSpeed shard states that the trainer's checkpoints do not hold: refused, not half-supported."""
    with pytest.raises(ValueError, match="data-parallel.*FSDP"):
        refuse_unaware_copies(SimpleNamespace(num_processes=1, distributed_type=DistributedType.FSDP))


def test_missing_training_extras_say_how_to_install_them(flags, tmp_path, run_example, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit):
        run_example("train_vae", [*flags(tmp_path / "out"), "--report_to", "tensorboard"])
    error = capsys.readouterr().err
    assert (
        "tensorboard (for --report_to tensorboard)" in error and "pip install 'diffusers_custom_vae[train]'" in error
    )
    assert not (tmp_path / "out").exists()


def test_fewer_images_than_a_batch_is_a_clear_error(flags, tmp_path, run_example, capsys):
    for index in range(3):
        Image.new("RGB", (40, 40), (index * 80, 0, 0)).save(tmp_path / f"{index}.png")
    with pytest.raises(SystemExit):
        run_example(
            "train_vae", [*flags(tmp_path / "out"), "--train_data_dir", str(tmp_path), "--train_batch_size", "8"]
        )
    assert re.search(r"2 images.*batch of 8", capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ the output folder


@pytest.fixture(scope="module")
def folder_run(model_config, image_folder, tmp_path_factory):
    """One run shared by the tests that inspect its output: EMA, flips, GAN, validation every 2 steps, tensorboard."""
    output_dir = tmp_path_factory.mktemp("runs") / "folder-vae"
    config = TrainConfig(
        model_config=model_config,
        train_data_dir=str(image_folder),
        output_dir=str(output_dir),
        resolution=[32],
        train_batch_size=2,
        max_train_steps=3,
        use_ema=True,
        random_flip=True,
        validation_steps=2,
        disc_scale=0.5,
    )
    return SimpleNamespace(output_dir=output_dir, metrics=train(config, VAEObjective))


def test_the_output_folder_holds_a_loadable_model_metrics_grid_and_card(folder_run):
    out = folder_run.output_dir
    vae = CustomVAE.from_pretrained(out)
    assert list(vae.config.block_out_channels) == TINY_8X["block_out_channels"]
    assert finite_and_not(vae.config.scaling_factor, 1.0)  # estimated from the training data
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(metrics[name]) for name in ("psnr", "ssim", "ms_ssim", "train_images_per_second"))
    assert metrics["images"] >= 1 and metrics["psnr"] == pytest.approx(folder_run.metrics["psnr"])
    assert json.loads((out / "training_config.json").read_text())["disc_scale"] == 0.5
    grid = Image.open(out / "reconstructions.png")
    assert grid.height > 2 * 32  # originals above reconstructions
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license
    assert set(card.data.metrics) == {"psnr", "ssim", "ms_ssim"}
    assert card.text.split("```python\n")[1].startswith("import diffusers_custom_vae")
    assert "![reconstructions](reconstructions.png)" in card.text and "PatchGAN 0.5" in card.text
    assert checkpoint_steps(out) == [3]


def test_card_metadata_is_valid_yaml(folder_run):
    metadata = yaml.safe_load((folder_run.output_dir / "README.md").read_text().split("---")[1])
    assert metadata["library_name"] == "diffusers" and "diffusers_custom_vae" in metadata["tags"]
    assert "datasets" not in metadata  # a local folder is not a Hub dataset: no empty list either


def test_tensorboard_logs_each_loss_term_lr_grad_norm_and_validation(folder_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (folder_run.output_dir / "logs" / "train_vae").glob("events.out.tfevents.*")
    logs = EventAccumulator(str(events)).Reload()
    scalars = set(logs.Tags()["scalars"])
    expected = {"loss", "rec", "kl", "g_adv", "adaptive_weight", "d_loss", "lr", "grad_norm", "images_per_second"}
    assert expected | {"validation/psnr", "validation/ssim"} <= scalars, scalars
    assert all(math.isfinite(event.value) for event in logs.Scalars("rec"))
    assert "validation/reconstructions" in logs.Tags()["images"]
    assert [event.step for event in logs.Scalars("validation/psnr")] == [2, 3]


def test_unreadable_files_are_skipped_and_counted(flags, tmp_path, run_example, capsys):
    run_example("train_vae", [*flags(tmp_path / "out"), "--max_train_steps", "1"])
    assert "Skipped 2 unreadable image file(s)" in capsys.readouterr().out


def test_evaluate_example_measures_the_trainers_held_out_split(
    folder_run, image_folder, tmp_path, run_example, capsys
):
    out = folder_run.output_dir
    argv = ["--vae", str(out), "--vae", str(out), "--train_data_dir", str(image_folder), "--resolution", "32"]
    results = run_example("evaluate_vae", [*argv, "--output", str(tmp_path / "grid.png")])
    assert results[str(out)]["psnr"] == pytest.approx(folder_run.metrics["psnr"], rel=1e-4)
    assert Image.open(tmp_path / "grid.png").height > 3 * 32  # originals and two rows of reconstructions
    assert f"| {out} | {folder_run.metrics['psnr']:.2f} |" in capsys.readouterr().out


def test_push_to_hub_uploads_the_folder_and_never_the_token(flags, tmp_path, run_example, monkeypatch, capsys):
    uploads = []
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
        uploads.append((repo_id, allow_patterns))
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    run_example(
        "train_vae", [*flags(out), "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "user/dog-vae"]
    )
    ((repo_id, files),) = uploads
    assert repo_id == "user/dog-vae" and {"README.md", "config.json", "metrics.json"} <= set(files)
    assert 'CustomVAE.from_pretrained("user/dog-vae")' in (out / "README.md").read_text()
    assert "hf_SECRETtoken123" not in capsys.readouterr().out
    for path in out.rglob("*"):
        assert not path.is_file() or b"hf_SECRETtoken123" not in path.read_bytes(), path


def test_push_uploads_only_what_the_trainer_wrote(flags, tmp_path, run_example, monkeypatch):
    """The user's .env, notes and photos in the output folder stay home; so do checkpoints and logs."""
    from huggingface_hub.utils import filter_repo_objects

    out = tmp_path / "out"
    out.mkdir()
    for name in (".env", "notes.txt", "holiday.jpg"):
        (out / name).write_text("private")
    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded.extend(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        return "https://huggingface.co/user/vae/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    run_example("train_vae", [*flags(out), "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "user/vae"])
    expected = {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "metrics.json"}
    assert expected | {"reconstructions.png", "training_config.json"} <= set(uploaded)
    assert not {".env", "notes.txt", "holiday.jpg"} & set(uploaded)
    assert not any(name.startswith(("checkpoint-", "logs")) for name in uploaded)


def test_push_uploads_exactly_the_files_the_run_wrote_as_it_wrote_them(
    flags, tmp_path, run_example, monkeypatch, capsys
):
    """`--push_to_hub > out/train.log`: a file written while the run exports (later mtime, a token inside) stays
    home, and so does one of the run's own files changed after it was written."""
    from huggingface_hub.utils import filter_repo_objects

    out, uploaded = tmp_path / "out", []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded.extend(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        return "https://huggingface.co/user/vae/commit/1"

    original_grid = VAEObjective.comparison_grid

    def grid_while_others_write(self, model, images):
        (out / "train.log").write_text("HF_TOKEN=hf_SECRET")  # the shell's redirection, written during the run
        with open(out / "training_config.json", "a") as settings:  # the run's own file, changed after it was written
            settings.write("edited")
        return original_grid(self, model, images)

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(VAEObjective, "comparison_grid", grid_while_others_write)
    run_example("train_vae", [*flags(out), "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "user/vae"])
    expected = {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "metrics.json"}
    assert set(uploaded) == expected | {"modeling_custom_vae.py", "reconstructions.png"}, uploaded
    assert "Not pushing training_config.json" in capsys.readouterr().out


def test_tiny_held_out_images_do_not_break_the_export(model_config, tmp_path, run_example):
    """A 1x1 or 12x12 image among the held-out ones made MS-SSIM raise after all steps: no model was saved."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for index, size in enumerate([(1, 1), (12, 12), (5, 9), (12, 12), (3, 40), (1, 1)]):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"{index}.png")
    argv = ["--model_config", model_config, "--train_data_dir", str(folder), "--resolution", "16"]
    metrics = run_example(
        "train_vae",
        [
            *argv,
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_steps",
            "1",
            "--train_batch_size",
            "2",
            "--report_to",
            "none",
        ],
    )
    assert all(math.isfinite(metrics[name]) for name in ("psnr", "ssim", "ms_ssim"))
    vae = CustomVAE.from_pretrained(tmp_path / "out")  # the saved model works: a latent decodes to a finite image
    with torch.no_grad():
        image = vae.decode(torch.zeros(1, vae.config.latent_channels, 2, 2)).sample
    factor = vae.downsample_factor
    assert image.shape == (1, 3, 2 * factor, 2 * factor) and torch.isfinite(image).all()


def test_local_datasets_dataset_map_style_and_streamed(flags, tmp_path, run_example):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    datasets.Dataset.from_dict({"picture": images}).save_to_disk(str(tmp_path / "ds"))
    dataset = ["--dataset_name", str(tmp_path / "ds"), "--image_column", "picture", "--max_train_steps", "2"]
    no_folder = flags(tmp_path / "out")
    no_folder = no_folder[: no_folder.index("--train_data_dir")] + no_folder[no_folder.index("--train_data_dir") + 2 :]
    for name, extra in (("map", []), ("streamed", ["--streaming"])):
        run_example("train_vae", [*no_folder, *dataset, *extra, "--output_dir", str(tmp_path / name)])
        assert finite_and_not(CustomVAE.from_pretrained(tmp_path / name).config.scaling_factor, 1.0)


# ---------------------------------------------------------------------------------------------- the loop's promises


def test_stop_and_resume_ends_with_the_same_weights(flags, tmp_path, run_example, monkeypatch):
    """Interrupted (Ctrl-C) after 2 of 4 steps and resumed, a run ends exactly where an uninterrupted one does: model,
    optimiser, scheduler, EMA, discriminator, RNG and data position (mid-epoch, with gradient accumulation) all come
    back."""
    common = "--use_ema --gradient_accumulation_steps 2 --random_flip --lr_warmup_steps 1 --max_train_steps 4".split()
    common += "--disc_scale 0.5 --disc_start 1".split()  # the adversarial term and the discriminator's updates
    run_example("train_vae", [*flags(tmp_path / "straight"), *common])

    original_loss, pressed = VAEObjective.loss, []

    def ctrl_c_during_step_2(self, module, images, step):
        if step == 1 and not pressed:  # once: a second Ctrl-C stops at once, without a checkpoint
            pressed.append(os.kill(os.getpid(), signal.SIGINT))  # the trainer's handler asks to stop after this step
        return original_loss(self, module, images, step)

    monkeypatch.setattr(VAEObjective, "loss", ctrl_c_during_step_2)
    with pytest.raises(SystemExit) as exit_info:  # the command line exits quietly, with 130
        run_example("train_vae", [*flags(tmp_path / "resumed"), *common])
    assert exit_info.value.code == 130
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path / "resumed") == [2]  # saved on the way out
    run_example("train_vae", [*flags(tmp_path / "resumed"), *common, "--resume_from_checkpoint", "latest"])
    straight, resumed = load_weights(tmp_path / "straight"), load_weights(tmp_path / "resumed")
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_checkpoints_are_pruned_and_latest_skips_partial_ones(flags, tmp_path, run_example):
    out = tmp_path / "out"
    checkpoints = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    run_example("train_vae", [*flags(out), "--max_train_steps", "4", *checkpoints])
    assert checkpoint_steps(out) == [3, 4]
    # A process killed while saving leaves only a .partial folder: resuming ignores it.
    (out / "checkpoint-9.partial").mkdir()
    (out / "checkpoint-9.partial" / "model.safetensors").write_bytes(b"half a file")
    run_example(
        "train_vae", [*flags(out), "--max_train_steps", "5", "--resume_from_checkpoint", "latest", *checkpoints]
    )
    assert checkpoint_steps(out) == [4, 5] and not (out / "checkpoint-9.partial").exists()


def test_non_finite_loss_stops_before_the_weights_change(flags, tmp_path, run_example, monkeypatch, capsys):
    original_loss = VAEObjective.loss

    def nan_at_step_3(self, module, images, step):
        loss, terms = original_loss(self, module, images, step)
        return (loss * float("nan") if step == 2 else loss), terms

    monkeypatch.setattr(VAEObjective, "loss", nan_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        run_example("train_vae", [*flags(out), "--max_train_steps", "4", "--checkpointing_steps", "1"])
    assert "not finite at step 3" in capsys.readouterr().err
    assert checkpoint_steps(out) == [1, 2]
    monkeypatch.setattr(VAEObjective, "loss", original_loss)
    run_example("train_vae", [*flags(out), "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert all(torch.isfinite(tensor).all() for tensor in load_weights(out).values())
    assert math.isfinite(CustomVAE.from_pretrained(out).config.scaling_factor)


class NaNGradient(torch.autograd.Function):
    """The identity forward; NaN gradients backward: a finite loss whose step would write NaN weights."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradients_with_a_finite_loss_stop_before_the_weights_change(
    flags, tmp_path, run_example, monkeypatch, capsys
):
    original_loss = VAEObjective.loss

    def nan_gradients_at_step_3(self, module, images, step):
        loss, terms = original_loss(self, module, images, step)
        return (NaNGradient.apply(loss) if step == 2 else loss), terms

    monkeypatch.setattr(VAEObjective, "loss", nan_gradients_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_example("train_vae", [*flags(out), "--max_train_steps", "4", "--checkpointing_steps", "1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not finite at step 3" in error and "grad_norm=nan" in error, error
    assert checkpoint_steps(out) == [1, 2] and f"{out / 'checkpoint-2'} is intact" in error
    weights = safetensors.torch.load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_a_stop_request_is_announced_once_and_dataloader_workers_ignore_it(capfd):
    """Ctrl-C reaches every process of the terminal, DataLoader workers (forked, with the trainer's handler) too."""
    with StopRequest() as stop:
        worker = os.fork()
        if worker == 0:  # a worker process: Ctrl-C there neither announces nor asks to stop
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(3 if stop.requested else 0)
        os.kill(os.getpid(), signal.SIGINT)
        assert os.waitpid(worker, 0)[1] >> 8 == 0
        assert stop.requested
    with StopRequest(announce=False) as quiet:  # another process of a multi-process run
        os.kill(os.getpid(), signal.SIGINT)
        assert quiet.requested
    assert capfd.readouterr().out.count("Stopping after this step") == 1


def test_non_finite_check_covers_every_accumulated_batch(flags, tmp_path, run_example, monkeypatch, capsys):
    """A NaN in the first of two accumulated batches is caught at the update, though the second batch is finite."""
    original_loss = VAEObjective.loss
    calls = []

    def nan_in_first_batch(self, module, images, step):
        loss, terms = original_loss(self, module, images, step)
        calls.append(step)
        return (loss * float("nan") if len(calls) == 1 else loss), terms

    monkeypatch.setattr(VAEObjective, "loss", nan_in_first_batch)
    with pytest.raises(SystemExit):
        run_example("train_vae", [*flags(tmp_path / "out"), "--gradient_accumulation_steps", "2"])
    assert "not finite at step 1" in capsys.readouterr().err and calls == [0, 0]


def test_same_seed_same_weights(flags, tmp_path, run_example):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_example("train_vae", [*flags(tmp_path / name), "--max_train_steps", "2", "--random_flip", "--seed", seed])
    first, second, other = (load_weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["decoder.conv_out.weight"], other["decoder.conv_out.weight"])


def test_trains_a_diffusers_autoencoderkl_and_fine_tunes_its_decoder(flags, tmp_path, run_example):
    """The same trainer trains AutoencoderKL (the side-by-side benchmark, and fine-tuning SD's VAE): decoder-only
    training keeps the encoder, hence the latent space and the scaling factor."""
    from diffusers import AutoencoderKL

    (tmp_path / "akl.json").write_text(json.dumps(TINY_AUTOENCODER_KL_CONFIG))
    run_example("train_vae", [*flags(tmp_path / "akl"), "--model_config", str(tmp_path / "akl.json")])
    trained = AutoencoderKL.from_pretrained(tmp_path / "akl")
    assert finite_and_not(trained.config.scaling_factor, 0.18215)  # estimated from the data
    assert "from diffusers import AutoencoderKL" in (tmp_path / "akl" / "README.md").read_text()

    decoder_flags = ["--pretrained_model_name_or_path", str(tmp_path / "akl"), "--train_decoder_only"]
    run_example("train_vae", [*flags(tmp_path / "decoder"), *decoder_flags])
    fine_tuned = AutoencoderKL.from_pretrained(tmp_path / "decoder")
    assert fine_tuned.config.scaling_factor == trained.config.scaling_factor
    before, after = trained.state_dict(), fine_tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])


# ----------------------------------------------------------------------------------- end to end, in processes: slow


def launch(*command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_one_model(flags, tmp_path):
    """Two CPU processes (gloo): one model whose replicas stay identical, files written once."""
    out = tmp_path / "out"
    accelerate = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1".split()
    accelerate += "--mixed_precision no --dynamo_backend no".split()
    script = str(REPO / "examples" / "train_vae.py")
    result = launch(
        sys.executable,
        *accelerate,
        script,
        *flags(out, "--checkpointing_steps", "2", "--disc_scale", "0.5"),
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CustomVAE on 2 process(es) (MULTI_CPU" in result.stdout
    assert "All 2 processes hold identical weights" in result.stdout
    assert result.stdout.count("Saved to") == 1  # only the main process exports
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*")) == ["rng_state_0.pt", "rng_state_1.pt"]
    CustomVAE.from_pretrained(out)


@pytest.mark.slow
def test_torchrun_without_the_cpu_switch_is_refused(flags, tmp_path):
    """On a machine without GPUs, plain torchrun starts processes that each think they are alone: refused."""
    if torch.cuda.is_available():
        pytest.skip("with GPUs, torchrun starts a real distributed run")
    out = tmp_path / "out"
    script = str(REPO / "examples" / "train_vae.py")
    environment = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *flags(out)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0  # torchrun reports its children's failure with its own status
    assert re.search("train_vae.py: error: 2 processes.*accelerate sees 1", result.stderr)
    assert not (out / "config.json").exists()


@pytest.mark.slow
def test_mixed_precision_checkpointing_and_every_loss_term(flags, tmp_path):
    """bf16 autocast keeps float32 master weights; gradient checkpointing, MS-SSIM, KL warm-up and the GAN all run.
    (A process of its own: accelerate fixes the mixed precision of a process once, at its first Accelerator.)"""
    extra = "--mixed_precision bf16 --gradient_checkpointing --ms_ssim_scale 0.2 --kl_warmup_steps 2 --disc_scale 0.5"
    result = launch(sys.executable, str(REPO / "examples" / "train_vae.py"), *flags(tmp_path, *extra.split()))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stdout
    assert math.isfinite(json.loads((tmp_path / "metrics.json").read_text())["psnr"])
    assert all(tensor.dtype == torch.float32 for tensor in load_weights(tmp_path).values())


@pytest.mark.slow
def test_default_data_run(model_config, tmp_path, run_example):
    """The embedded photos, as the main job uses them (2 steps: their whole test photos take a while)."""
    argv = ["--model_config", model_config, "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    metrics = run_example(
        "train_vae", [*argv, "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2"]
    )
    assert all(math.isfinite(metrics[k]) for k in ("psnr", "ssim", "ms_ssim", "train_images_per_second"))
    assert metrics["train_steps"] == 2 and "chelsea" in metrics["split"]
    assert "CC BY 2.0" in (tmp_path / "out" / "README.md").read_text()  # the photos' credit travels with the weights
