"""diffusers_custom_vae.evaluation and examples/evaluate_vae.py: a trained VAE is measured on the images its training
held out (read from its training record), and held-out images one latent pixel in size are measured, not fatal."""

import json
import math
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.evaluation import (
    comparison_grid,
    evaluate_distillation,
    evaluate_vae,
    held_out_data,
    reconstruct,
)
from diffusers_custom_vae.training import TrainConfig, VAEObjective

# The config: as many norm groups (32, the default) as channels, so a 1x1 latent of one image is one value
# per group. Kept at 2x downsampling here (8x in the issue) to stay small.
GROUPS_AS_CHANNELS = {"block_out_channels": [32, 32], "layers_per_block": 1}
TINY_2X = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def train_only_dataset(tmp_path_factory) -> str:
    """A local dataset with only a train split: 40 noise images, of which the trainer holds out 2 by its seed."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(40)]
    path = tmp_path_factory.mktemp("data") / "train-only"
    datasets.Dataset.from_dict(
        {"image": images}, features=datasets.Features({"image": datasets.Image()})
    ).save_to_disk(path)
    return str(path)


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def train_flags(output_dir: Path, model_config: str, *extra: str) -> list[str]:
    tiny = "--resolution 16 --train_batch_size 2 --max_train_steps 1 --report_to none".split()
    return ["--model_config", model_config, "--output_dir", str(output_dir), *tiny, *extra]


# ---------------------------------------------------------------------- the split a training held out (issue 14.5)


def test_evaluation_measures_the_rows_the_training_held_out(tmp_path, run_example, train_only_dataset, caplog, capsys):
    out = tmp_path / "vae"
    model_config = write_json(tmp_path / "tiny.json", TINY_2X)
    run_example("train_vae", train_flags(out, model_config, "--dataset_name", train_only_dataset, "--seed", "42"))
    trained = json.loads((out / "metrics.json").read_text())
    assert "with seed 42" in trained["split"] and math.isfinite(trained["psnr"])
    grid = ["--output", str(tmp_path / "grid.png")]

    # No data flags: the data and seed come from the model's training_config.json.
    results = run_example("evaluate_vae", ["--vae", str(out), *grid])
    assert results[str(out)]["psnr"] == pytest.approx(trained["psnr"], rel=1e-5)
    assert "with seed 42" in capsys.readouterr().out
    # The dataset named, as before evaluate_vae had --seed: still the rows its training held out.
    named = run_example("evaluate_vae", ["--vae", str(out), "--dataset_name", train_only_dataset, *grid])
    assert named[str(out)]["psnr"] == pytest.approx(trained["psnr"], rel=1e-5)
    assert "trained with" not in caplog.text

    # Another seed draws other rows, some of which it trained on: measured, and said so.
    other = run_example(
        "evaluate_vae", ["--vae", str(out), "--dataset_name", train_only_dataset, "--seed", "0", *grid]
    )
    assert math.isfinite(other[str(out)]["psnr"]) and other[str(out)]["psnr"] != pytest.approx(trained["psnr"])
    assert re.search(r"vae was trained with seed=42: .*held out other images", caplog.text)


def test_vaes_whose_training_held_out_other_rows_need_a_seed(tmp_path, run_example, tiny_vae, capsys, caplog):
    """Two models trained on one dataset with other seeds have no common held-out rows: the user chooses."""
    dataset = str(tmp_path / "shared-dataset")
    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"vae-seed-{seed}"
        tiny_vae.save_pretrained(folder)
        write_json(folder / "training_config.json", TrainConfig(dataset_name=dataset, seed=seed).to_json_dict())
        folders += ["--vae", str(folder)]
    grid = tmp_path / "grid.png"

    with pytest.raises(SystemExit) as exit_info:
        run_example("evaluate_vae", [*folders, "--output", str(grid)])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1, error
    assert re.search(r"held out other images .*--seed", error) and not grid.exists()

    assert held_out_data([f for f in folders if f != "--vae"], seed=1) == {
        "dataset_name": dataset,
        "dataset_config_name": None,
        "image_column": "image",
        "train_data_dir": None,
        "seed": 1,
        "streaming": False,
    }
    assert "vae-seed-2 was trained with seed=2" in caplog.text and "vae-seed-1 " not in caplog.text


def test_a_record_naming_a_folder_that_is_not_here_is_one_line(tmp_path, run_example, tiny_vae, capsys):
    tiny_vae.save_pretrained(tmp_path / "vae")
    config = TrainConfig(train_data_dir="data/dogs").to_json_dict()  # relative to where it was trained
    write_json(tmp_path / "vae" / "training_config.json", config)
    with pytest.raises(SystemExit) as exit_info:
        run_example("evaluate_vae", ["--vae", str(tmp_path / "vae"), "--output", str(tmp_path / "grid.png")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(r"'data/dogs'.*--train_data_dir", error), error


def test_other_data_than_the_training_record_is_measured_without_a_warning(tmp_path, tiny_vae, caplog):
    tiny_vae.save_pretrained(tmp_path / "vae")
    write_json(tmp_path / "vae" / "training_config.json", TrainConfig(dataset_name="user/dogs", seed=7).to_json_dict())
    (tmp_path / "cats").mkdir()
    assert held_out_data([tmp_path / "vae"], train_data_dir=str(tmp_path / "cats"), seed=None) == {
        "train_data_dir": str(tmp_path / "cats")
    }
    assert held_out_data(["user/hub-vae"]) == {}  # no record: load_data's defaults (the embedded photos)
    assert caplog.text == ""


# ---------------------------------------------------------------------- images one latent pixel in size (issue 14.16)


def test_an_image_one_latent_pixel_in_size_is_padded_and_measured_on_its_own_pixels(caplog):
    torch.manual_seed(0)
    vae, teacher = CustomVAE(**GROUPS_AS_CHANNELS).eval(), CustomVAE(**TINY_2X).eval()
    image = torch.rand(3, 2, 2) * 2 - 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what the run met
        vae(image[None])

    reconstruction = reconstruct(vae, image[None])
    assert reconstruction.shape == (1, 3, 2, 2) and torch.isfinite(reconstruction).all()
    metrics = evaluate_vae(vae, [image, torch.rand(3, 4, 6) * 2 - 1])
    assert all(math.isfinite(value) for value in metrics.values())
    assert "1 of 2 held-out images (2x2 pixels: one latent pixel) were padded to 4x4" in caplog.text
    distillation = evaluate_distillation(vae, teacher, [image])
    assert all(math.isfinite(value) for value in distillation.values())
    assert comparison_grid([vae], image[None]).size == (2 + 4, 2 * 4 + 2)  # 1 column, 2 rows, 2 px padding


def test_a_run_whose_held_out_images_are_one_latent_pixel_finishes(tmp_path, run_example, caplog):
    """The issue's run: 1x1 images (enlarged to 8x8, one latent pixel of its 8x config) stopped at held-out metrics."""
    folder = tmp_path / "tiny-images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(30):
        Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    model_config = write_json(tmp_path / "config.json", {"block_out_channels": [32] * 4, "layers_per_block": 1})
    out = tmp_path / "out"
    metrics = run_example("train_vae", train_flags(out, model_config, "--train_data_dir", str(folder)))
    assert metrics["images"] >= 1 and all(math.isfinite(metrics[name]) for name in ("psnr", "ssim", "ms_ssim"))
    assert "(8x8 pixels: one latent pixel) were padded to 16x16" in caplog.text
    assert (out / "reconstructions.png").is_file() and (out / "README.md").is_file()


def test_validation_of_one_image_one_latent_pixel_in_size_is_measured(tmp_path):
    """A validation batch of one image at --resolution 8 with that config: the trainer's validation pads it too."""
    model_config = write_json(tmp_path / "config.json", {"block_out_channels": [32] * 4, "layers_per_block": 1})
    objective = VAEObjective(TrainConfig(model_config=model_config))
    scores, grids = objective.validate(objective.model.eval(), torch.rand(1, 3, 8, 8) * 2 - 1)
    assert all(math.isfinite(value) for value in scores.values())
    assert grids["reconstructions"][1].shape == (1, 3, 8, 8)
