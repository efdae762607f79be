"""The output folder of a run: the model, metrics.json, a grid of held-out images, the model card, the training
config; then the optional push to the Hub."""

import json
from pathlib import Path

import torch

from ..evaluation import common_crop
from ..hub import render_model_card, upload_folder_to_hub
from ..modeling_custom_vae import downsample_factor_of
from .config import TrainConfig


@torch.no_grad()
def write_output_folder(model, objective, data, config: TrainConfig, num_processes: int, throughput: dict) -> dict:
    """Writes the output folder (see the module docstring) and pushes it when `config.push_to_hub`; returns what
    metrics.json holds: the objective's held-out metrics and the training throughput."""
    output_dir = Path(config.output_dir)
    model.eval()
    objective.finish(model, data, config)  # e.g. the scaling factor, before the config is saved
    metrics = objective.evaluate(model, data)
    model.save_pretrained(output_dir)
    summary = {**metrics, "split": data.test_description, "images": len(data.test), **throughput}
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "training_config.json").write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
    grid_images = common_crop(data.test, multiple=downsample_factor_of(model))
    objective.comparison_grid(model, grid_images).save(output_dir / "reconstructions.png")
    card = render_model_card(
        model,
        repo_id=config.hub_model_id,
        metrics=metrics,
        metrics_split=data.test_description,
        grid_image="reconstructions.png",
        datasets=data.dataset_ids or None,
        training=training_summary(config, objective, num_processes, throughput),
        credits=data.credits,
    )
    card.save(output_dir / "README.md")
    print(
        f"Held-out {data.test_description}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + f". Saved to {output_dir}."
    )
    if data.skipped:
        print(f"Skipped {len(data.skipped)} unreadable image file(s), e.g. {data.skipped[0]}.")
    if config.push_to_hub:
        repo_id = config.hub_model_id or output_dir.name
        url = upload_folder_to_hub(output_dir, repo_id, ignore_patterns=["checkpoint-*", "logs/*"])
        print(f"Pushed to {url}")
    return summary


def training_summary(config: TrainConfig, objective, num_processes: int, throughput: dict) -> str:
    """The model card's "Training" paragraph."""
    steps = config.max_train_steps or f"{config.num_train_epochs} epochs"
    speed = ""
    if throughput["train_steps"]:
        minutes, images_per_second = throughput["train_seconds"] / 60, throughput["train_images_per_second"]
        speed = f" The last run took {minutes:.1f} min of steps ({images_per_second:.1f} images/s)."
    height, width = config.resolution
    return (
        f"Trained with `diffusers_custom_vae.training.train` for {steps} steps of "
        f"{config.images_per_step * num_processes} images at {height}x{width} on {num_processes} process(es): "
        f"{objective.description}; AdamW, learning rate {config.learning_rate} ({config.lr_scheduler}), seed "
        f"{config.seed}{', EMA weights' if config.use_ema else ''}. The full settings are in `training_config.json`."
        f"{speed}"
    )
