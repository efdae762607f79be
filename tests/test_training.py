"""The trainer end to end: short runs with a tiny config, as `examples/train_vae.py` runs them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from PIL import Image

from diffusers_custom_vae import CustomVAE, training
from diffusers_custom_vae.losses import VAELoss
from diffusers_custom_vae.training import TrainConfig, _refuse_unaware_copies, checkpoint_steps, parse_args

REPO = Path(__file__).resolve().parents[1]
# 8x downsampling like the default model, so whole held-out photos give few attention tokens.
TINY_8X = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY_8X))
    return str(path)


def args(model_config, output_dir, *extra) -> list[str]:
    """A tiny, fast run: 32 px, batches of 2, 3 steps, no tensorboard."""
    tiny = "--resolution 32 --train_batch_size 2 --max_train_steps 3 --report_to none".split()
    return ["--model_config", model_config, "--output_dir", str(output_dir), *tiny, *extra]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Nested class folders of real-looking images in every format and mode, plus a corrupt and a truncated file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(12):
        pixels = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        folder = root / ("dogs" if index % 2 else "cats" / Path("nested"))
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


@pytest.fixture(scope="module")
def folder_run(image_folder, model_config, tmp_path_factory):
    """One run on the image folder, shared by the tests that inspect its output."""
    output_dir = tmp_path_factory.mktemp("runs") / "folder-vae"
    from diffusers_custom_vae.training import train

    metrics = train(
        parse_args(
            args(
                model_config,
                output_dir,
                "--train_data_dir",
                str(image_folder),
                "--use_ema",
                "--validation_steps",
                "2",
                "--random_flip",
            )
        )
    )
    return SimpleNamespace(output_dir=output_dir, metrics=metrics)


def test_folder_run_writes_a_loadable_model_with_metrics_grid_and_card(folder_run):
    out = folder_run.output_dir
    vae = CustomVAE.from_pretrained(out)
    assert list(vae.config.block_out_channels) == TINY_8X["block_out_channels"]
    assert vae.config.scaling_factor != 1.0  # estimated from the training data
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"psnr", "ssim", "ms_ssim"} <= set(metrics) and metrics["images"] >= 1
    assert metrics["psnr"] == pytest.approx(folder_run.metrics["psnr"])
    grid = Image.open(out / "reconstructions.png")
    assert grid.height > 2 * 32  # originals above reconstructions
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license
    assert set(card.data.metrics) == {"psnr", "ssim", "ms_ssim"}
    usage = card.text.split("```python\n")[1]
    assert usage.startswith("import diffusers_custom_vae")
    assert "![reconstructions](reconstructions.png)" in card.text
    assert checkpoint_steps(out) == [3]


def test_bad_files_are_skipped_and_counted(image_folder, model_config, tmp_path, capsys):
    from diffusers_custom_vae.training import train

    train(
        parse_args(
            args(model_config, tmp_path / "out", "--train_data_dir", str(image_folder), "--max_train_steps", "1")
        )
    )
    assert "Skipped 2 unreadable image file(s)" in capsys.readouterr().out


def test_default_data_run(model_config, tmp_path, run_example):
    metrics = run_example("train_vae", args(model_config, tmp_path / "out", "--max_train_steps", "2"))
    assert all(np.isfinite(metrics[k]) for k in ("psnr", "ssim", "ms_ssim", "train_images_per_second"))
    assert metrics["train_steps"] == 2 and "chelsea" in metrics["split"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "CC BY 2.0" in card  # the embedded photos' credit travels with the weights


def test_local_datasets_dataset(model_config, tmp_path, run_example):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    datasets.Dataset.from_dict({"picture": images}).save_to_disk(str(tmp_path / "ds"))
    dataset = ["--dataset_name", str(tmp_path / "ds"), "--image_column", "picture", "--max_train_steps", "2"]
    run_example("train_vae", args(model_config, tmp_path / "out", *dataset))
    assert CustomVAE.from_pretrained(tmp_path / "out").config.scaling_factor != 1.0
    run_example("train_vae", args(model_config, tmp_path / "streamed", *dataset, "--streaming"))
    assert CustomVAE.from_pretrained(tmp_path / "streamed").config.scaling_factor != 1.0
    with pytest.raises(ValueError, match="no image column 'image'"):
        run_example("train_vae", args(model_config, tmp_path / "out2", "--dataset_name", str(tmp_path / "ds")))


def _weights(folder) -> dict[str, torch.Tensor]:
    return CustomVAE.from_pretrained(folder).state_dict()


def test_stop_and_resume_ends_with_the_same_weights(image_folder, model_config, tmp_path, run_example, monkeypatch):
    """Interrupted (Ctrl-C) after 2 of 4 steps and resumed, a run ends exactly where an uninterrupted one does: model,
    optimiser, scheduler, EMA, discriminator, RNG and data position (mid-epoch, with gradient accumulation) all come
    back."""
    flags = "--use_ema --gradient_accumulation_steps 2 --random_flip --lr_warmup_steps 1 --max_train_steps 4"
    gan = "--disc_scale 0.5 --disc_start 1"  # the adversarial term and the discriminator's updates from step 1
    common = ["--train_data_dir", str(image_folder), *flags.split(), *gan.split()]
    run_example("train_vae", args(model_config, tmp_path / "straight", *common))

    def ctrl_c_during_validation(accelerator, model, ema, images, step):
        os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler asks to stop after this step

    monkeypatch.setattr(training, "_validate", ctrl_c_during_validation)
    with pytest.raises(KeyboardInterrupt):
        run_example("train_vae", args(model_config, tmp_path / "resumed", *common, "--validation_steps", "2"))
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path / "resumed") == [2]  # saved on the way out
    run_example("train_vae", args(model_config, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_checkpoints_are_pruned_and_latest_skips_partial_ones(model_config, tmp_path, run_example):
    out = tmp_path / "out"
    run_example(
        "train_vae",
        args(
            model_config, out, "--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"
        ),
    )
    assert checkpoint_steps(out) == [3, 4]
    # A process killed while saving leaves only a .partial folder: resuming ignores it.
    (out / "checkpoint-9.partial").mkdir()
    (out / "checkpoint-9.partial" / "model.safetensors").write_bytes(b"half a file")
    run_example(
        "train_vae",
        args(
            model_config,
            out,
            "--max_train_steps",
            "5",
            "--resume_from_checkpoint",
            "latest",
            "--checkpoints_total_limit",
            "2",
        ),
    )
    assert checkpoint_steps(out) == [4, 5] and not (out / "checkpoint-9.partial").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(model_config, tmp_path, run_example, monkeypatch):
    original = VAELoss.generator_loss

    def nan_at_step_3(self, output, target, step, last_layer=None):
        loss, terms = original(self, output, target, step, last_layer)
        return (loss * float("nan") if step == 2 else loss), terms

    monkeypatch.setattr(VAELoss, "generator_loss", nan_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match="not finite at step 3.*checkpoint-2 is intact"):
        run_example("train_vae", args(model_config, out, "--max_train_steps", "4", "--checkpointing_steps", "1"))
    assert checkpoint_steps(out) == [1, 2]
    monkeypatch.setattr(VAELoss, "generator_loss", original)
    run_example("train_vae", args(model_config, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert CustomVAE.from_pretrained(out).config.scaling_factor != 1.0


def test_push_to_hub_uploads_the_folder_and_never_the_token(model_config, tmp_path, run_example, monkeypatch, capsys):
    uploads = []
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        uploads.append((repo_id, sorted(os.listdir(folder_path)), ignore_patterns))
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    run_example("train_vae", args(model_config, out, "--push_to_hub", "--hub_model_id", "user/dog-vae"))
    ((repo_id, files, ignored),) = uploads
    assert repo_id == "user/dog-vae" and {"README.md", "config.json", "metrics.json"} <= set(files)
    assert "checkpoint-*" in ignored
    assert 'CustomVAE.from_pretrained("user/dog-vae")' in (out / "README.md").read_text()
    assert "hf_SECRETtoken123" not in capsys.readouterr().out
    for path in out.rglob("*"):
        assert not path.is_file() or b"hf_SECRETtoken123" not in path.read_bytes(), path


def test_card_metadata_is_valid_yaml(folder_run):
    header = (folder_run.output_dir / "README.md").read_text().split("---")[1]
    metadata = yaml.safe_load(header)
    assert metadata["library_name"] == "diffusers" and "diffusers_custom_vae" in metadata["tags"]
    assert "datasets" not in metadata  # a local folder is not a Hub dataset: no empty list either


def test_unaware_copies_are_refused(monkeypatch):
    """torchrun without the CPU switch starts processes that each think they are alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were launched but accelerate sees 1.*ACCELERATE_USE_CPU=1"):
        _refuse_unaware_copies(SimpleNamespace(num_processes=1))


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--resolution", "30"], "multiples of 8"),
        (["--train_data_dir", "a", "--dataset_name", "b"], "not both"),
        (["--streaming", "--dataset_name", "b"], "--streaming needs --max_train_steps"),
        (["--rec_loss", "l3"], "l1 or l2"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    ],
)
def test_invalid_flags_are_clear_errors(bad, message, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(bad)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_train_config_refuses_bad_values_from_python_too():
    with pytest.raises(ValueError, match="multiples of 8"):
        TrainConfig(resolution=(30,))
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(train_data_dir="a", dataset_name="b")


def test_resolution_flag_takes_one_or_two_numbers():
    assert parse_args(["--resolution", "64"]).resolution == (64, 64)
    assert parse_args(["--resolution", "64", "96"]).resolution == (64, 96)


def test_missing_folder_is_a_clear_error(model_config, tmp_path, run_example):
    with pytest.raises(ValueError, match="does not exist"):
        run_example("train_vae", args(model_config, tmp_path / "out", "--train_data_dir", str(tmp_path / "nope")))


def test_two_processes_train_one_model(model_config, tmp_path):
    """Two CPU processes (gloo): one model whose replicas stay identical, files written once."""
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "examples" / "train_vae.py"),
        *args(model_config, out, "--checkpointing_steps", "2"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CustomVAE on 2 process(es) (MULTI_CPU" in result.stdout
    assert "All 2 processes hold identical weights" in result.stdout
    assert result.stdout.count("Saved to") == 1  # only the main process exports
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir() if p.name.startswith("random_states")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    CustomVAE.from_pretrained(out)


def test_trains_a_diffusers_autoencoderkl_too(tmp_path, run_example):
    """The same trainer trains AutoencoderKL (the side-by-side benchmark, and fine-tuning SD's VAE): decoder-only
    training keeps the encoder, hence the latent space and the scaling factor."""
    from diffusers import AutoencoderKL

    config = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    (tmp_path / "akl.json").write_text(json.dumps(config))
    run_example("train_vae", args(str(tmp_path / "akl.json"), tmp_path / "akl", "--max_train_steps", "2"))
    trained = AutoencoderKL.from_pretrained(tmp_path / "akl")
    assert trained.config.scaling_factor != 0.18215  # estimated from the data
    assert "from diffusers import AutoencoderKL" in (tmp_path / "akl" / "README.md").read_text()

    run_example(
        "train_vae",
        [
            "--pretrained_model_name_or_path",
            str(tmp_path / "akl"),
            "--train_decoder_only",
            *args("unused", tmp_path / "decoder")[2:],
            "--max_train_steps",
            "2",
        ],
    )
    fine_tuned = AutoencoderKL.from_pretrained(tmp_path / "decoder")
    assert fine_tuned.config.scaling_factor == trained.config.scaling_factor
    before, after = trained.state_dict(), fine_tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])


def test_evaluate_example_compares_vaes(folder_run, image_folder, tmp_path, run_example, capsys):
    out = folder_run.output_dir
    results = run_example(
        "evaluate_vae",
        [
            "--vae",
            str(out),
            "--vae",
            str(out),
            "--train_data_dir",
            str(image_folder),
            "--resolution",
            "32",
            "--output",
            str(tmp_path / "grid.png"),
        ],
    )
    assert results[str(out)]["psnr"] == pytest.approx(folder_run.metrics["psnr"], rel=1e-4)  # the trainer's split
    assert Image.open(tmp_path / "grid.png").height > 3 * 32  # originals and two rows of reconstructions
    assert f"| {out} | {folder_run.metrics['psnr']:.2f} |" in capsys.readouterr().out


def test_mixed_precision_checkpointing_and_every_loss_term(model_config, tmp_path):
    """bf16 autocast keeps float32 master weights; gradient checkpointing, MS-SSIM, KL warm-up and the GAN all run.
    (A process of its own: accelerate fixes the mixed precision of a process once, at its first Accelerator.)"""
    flags = "--mixed_precision bf16 --gradient_checkpointing --ms_ssim_scale 0.2 --kl_warmup_steps 2 --disc_scale 0.5"
    command = [sys.executable, str(REPO / "examples" / "train_vae.py"), *args(model_config, tmp_path, *flags.split())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stdout
    assert np.isfinite(json.loads((tmp_path / "metrics.json").read_text())["psnr"])
    assert all(tensor.dtype == torch.float32 for tensor in _weights(tmp_path).values())


def test_same_seed_same_weights(model_config, tmp_path, run_example):
    for name in ("a", "b"):
        run_example("train_vae", args(model_config, tmp_path / name, "--max_train_steps", "2", "--random_flip"))
    first, second = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(first[name], second[name]) for name in first)
    run_example(
        "train_vae", args(model_config, tmp_path / "c", "--max_train_steps", "2", "--random_flip", "--seed", "1")
    )
    assert not torch.equal(first["decoder.conv_out.weight"], _weights(tmp_path / "c")["decoder.conv_out.weight"])


def test_tensorboard_logs_each_loss_term_lr_grad_norm_and_validation(model_config, tmp_path, run_example):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--report_to", "tensorboard", "--validation_steps", "2", "--disc_scale", "0.5"]
    run_example("train_vae", args(model_config, tmp_path / "out", *flags))
    (events,) = (tmp_path / "out" / "logs" / "train_vae").glob("events.out.tfevents.*")
    logs = EventAccumulator(str(events)).Reload()
    scalars = set(logs.Tags()["scalars"])
    expected = {"rec", "kl", "g_adv", "adaptive_weight", "d_loss", "lr", "grad_norm", "images_per_second"}
    assert expected | {"validation/psnr", "validation/ssim"} <= scalars, scalars
    assert "validation/reconstructions" in logs.Tags()["images"]
    assert [event.step for event in logs.Scalars("validation/psnr")] == [2, 3]


def test_torchrun_without_the_cpu_switch_is_refused(model_config, tmp_path):
    """On a machine without GPUs, plain torchrun starts processes that each think they are alone: refused."""
    if torch.cuda.is_available():
        pytest.skip("with GPUs, torchrun starts a real distributed run")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "examples" / "train_vae.py"),
        *args(model_config, out),
    ]
    environment = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "2 processes were launched but accelerate sees 1" in result.stderr
    assert not (out / "config.json").exists()


def test_missing_training_extras_say_how_to_install_them(model_config, tmp_path, run_example, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real_find_spec(name, *a)
    )
    with pytest.raises(
        ImportError, match=r"skimage \(for the embedded photos\).*pip install 'diffusers_custom_vae\[train\]'"
    ):
        run_example("train_vae", args(model_config, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_fewer_images_than_a_batch_is_a_clear_error(model_config, tmp_path, run_example):
    for index in range(3):
        Image.new("RGB", (40, 40), (index * 80, 0, 0)).save(tmp_path / f"{index}.png")
    with pytest.raises(ValueError, match=r"holds 2 images, fewer than one batch of 8 .*lower --train_batch_size"):
        run_example(
            "train_vae",
            args(model_config, tmp_path / "out", "--train_data_dir", str(tmp_path), "--train_batch_size", "8"),
        )
