"""Model cards and uploads to the Hugging Face Hub, through huggingface_hub's own API."""

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .latent_spaces import describe_latent_space, latent_space_of
from .modeling_custom_vae import downsample_factor_of
from .pipelines import save_pipeline

TEMPLATE = "custom_vae.md"
PIPELINE_TEMPLATE = "custom_vae_pipeline.md"


def _template_path(name: str) -> Path:
    installed = Path(__file__).parent / "model_cards" / name  # inside an installed wheel
    return installed if installed.exists() else Path(__file__).parent.parent / "model_cards" / name  # source checkout


def render_model_card(
    vae,
    repo_id: str | None = None,
    metrics: dict[str, float] | None = None,
    metrics_split: str = "held-out images",
    metrics_resolution: str | None = None,
    grid_image: str | None = None,
    grid_caption: str | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    description: str | None = None,
    training: str | None = None,
    credits: str | None = None,
) -> ModelCard:
    r"""
    Render the model card (README.md) of a `CustomVAE` (or of an `AutoencoderKL` trained by the package's trainer)
    from the template in `model_cards/`.

    Args:
        vae (`CustomVAE` or `AutoencoderKL`): The model the card describes (its config fills the card).
        repo_id (`str`, *optional*): Where it is published; used in the usage snippet.
        metrics (`dict[str, float]`, *optional*): Reconstruction metrics, e.g. `{"psnr": 25.1, "ssim": 0.71}`.
        metrics_split (`str`, *optional*): What the metrics were measured on, in words.
        metrics_resolution (`str`, *optional*): The image size they were measured at, e.g. `"256x256"`.
        grid_image (`str`, *optional*): Relative path of an image of originals above reconstructions.
        grid_caption (`str`, *optional*): What the image's rows are (default: originals, then reconstructions).
        datasets (`list[str]`, *optional*): Hub ids or names of the training data, for the card's metadata.
        license (`str`, *optional*, defaults to `"apache-2.0"`): The weights' licence, for the card's metadata.
        description (`str`, *optional*), training (`str`, *optional*), credits (`str`, *optional*): Markdown sections.
    """
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=["diffusers", "diffusers_custom_vae", "vae", "autoencoder", "image-to-image"],
        datasets=datasets,
        metrics=sorted(metrics) if metrics else None,
    )
    config = vae.config
    return ModelCard.from_template(
        card_data,
        template_path=str(_template_path(TEMPLATE)),
        title=repo_id.split("/")[-1] if repo_id else type(vae).__name__,
        model_class=type(vae).__name__,
        repo_id=repo_id or "path/to/this/folder",
        parameters=f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M",
        downsample_factor=downsample_factor_of(vae),
        latent_channels=config.latent_channels,
        scaling_factor=f"{config.scaling_factor:.5g}",
        shift_factor=None if config.shift_factor is None else f"{config.shift_factor:.5g}",
        latent_space=describe_latent_space(vae) if latent_space_of(vae) else None,
        metrics={name: f"{value:.4g}" for name, value in (metrics or {}).items()},
        metrics_split=metrics_split,
        metrics_resolution=metrics_resolution,
        grid_image=grid_image,
        grid_caption=grid_caption,
        description=description,
        training=training,
        credits=credits,
    )


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload CustomVAE",
    create_pr: bool = False,
    ignore_patterns: list[str] | None = None,
    allow_patterns: list[str] | None = None,
) -> str:
    r"""
    Create the model repo if needed and upload `folder` to it: only the files matching `allow_patterns` when given,
    and none matching `ignore_patterns` (e.g. `["checkpoint-*"]`). Returns the commit URL.

    The token is passed to huggingface_hub only (default: the one saved by `hf auth login`); it is never printed or
    written anywhere.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        create_pr=create_pr,
        ignore_patterns=ignore_patterns,
        allow_patterns=allow_patterns,
    )
    return str(commit)


def render_pipeline_card(pipe, repo_id: str | None = None, license: str | None = None) -> ModelCard:
    r"""
    Render the model card (README.md) of a pipeline saved by [`save_pipeline`]: what it is, and how to load it
    without the diffusers_custom_vae package (`trust_remote_code=True`).

    Args:
        pipe (`DiffusionPipeline`): The pipeline, with a `CustomVAE` as its `vae`.
        repo_id (`str`, *optional*): Where it is published; used in the usage snippet.
        license (`str`, *optional*): The licence of the weights, for the card's metadata.
    """
    card_data = ModelCardData(
        library_name="diffusers", license=license, tags=["diffusers", "diffusers_custom_vae", type(pipe).__name__]
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(_template_path(PIPELINE_TEMPLATE)),
        title=repo_id.split("/")[-1] if repo_id else type(pipe).__name__,
        pipeline_class=type(pipe).__name__,
        repo_id=repo_id or "path/to/this/folder",
        vae_parameters=f"{sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f}M",
        latent_space=describe_latent_space(pipe.vae) if latent_space_of(pipe.vae) else None,
    )


def push_pipeline_to_hub(
    pipe,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    variant: str | None = None,
    model_card: ModelCard | None = None,
) -> str:
    r"""
    Upload a pipeline whose VAE is a `CustomVAE`, saved by [`save_pipeline`], so that
    `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)` loads it where the diffusers_custom_vae
    package is not installed (one pushed by `pipe.push_to_hub` does not load by repo id: diffusers issue 6563).

    Args:
        pipe (`DiffusionPipeline`): The pipeline.
        repo_id (`str`): The repo to create or update, e.g. `"user/dog-diffusion"`.
        commit_message (`str`, *optional*), private (`bool`, *optional*), token (`str`, *optional*),
        create_pr (`bool`, *optional*, defaults to `False`): As in `huggingface_hub.HfApi.upload_folder`; the token
            is passed to huggingface_hub only, never printed or written.
        variant (`str`, *optional*): As in `save_pretrained`.
        model_card (`huggingface_hub.ModelCard`, *optional*):
            The card to upload. By default a card already in the repo is kept, else [`render_pipeline_card`]'s.

    Returns:
        `str`: the URL of the commit.
    """
    save = lambda folder: save_pipeline(pipe, folder, variant=variant)
    render = lambda: render_pipeline_card(pipe, repo_id=repo_id)
    commit_message = commit_message or f"Upload {type(pipe).__name__}"
    return _push_with_card(save, render, model_card, repo_id, commit_message, private, token, create_pr)


def push_vae_to_hub(
    vae,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    variant: str | None = None,
    model_card: ModelCard | None = None,
) -> str:
    r"""
    Upload a VAE's config, weights, modeling file (for loading without the package, `trust_remote_code=True`) and
    model card (README.md) to the Hub, in one commit. `vae.push_to_hub` is diffusers' own: the same files with
    diffusers' generic card.

    Args:
        vae (`CustomVAE` or `AutoencoderKL`): The model.
        repo_id (`str`): The repo to create or update, e.g. `"user/dog-vae"`.
        commit_message (`str`, *optional*), private (`bool`, *optional*), token (`str`, *optional*),
        create_pr (`bool`, *optional*, defaults to `False`): As in `huggingface_hub.HfApi.upload_folder`; the token
            is passed to huggingface_hub only, never printed or written.
        safe_serialization (`bool`, *optional*, defaults to `True`), variant (`str`, *optional*):
            As in `save_pretrained`.
        model_card (`huggingface_hub.ModelCard`, *optional*):
            The card to upload. By default a card already in the repo is kept (it may hold metrics), else
            [`render_model_card`]'s.

    Returns:
        `str`: the URL of the commit.
    """
    save = lambda folder: vae.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
    render = lambda: render_model_card(vae, repo_id=repo_id)
    commit_message = commit_message or f"Upload {type(vae).__name__}"
    return _push_with_card(save, render, model_card, repo_id, commit_message, private, token, create_pr)


def _push_with_card(save, render, model_card, repo_id, commit_message, private, token, create_pr) -> str:
    """Saves with `save(folder)` into a temporary folder, adds `model_card` (else `render()`'s, unless the repo has a
    card already) and uploads the folder in one commit."""
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        if model_card is None and not HfApi(token=token).file_exists(repo_id, "README.md"):
            model_card = render()
        if model_card is not None:
            model_card.save(os.path.join(folder, "README.md"))
        return upload_folder_to_hub(folder, repo_id, token, private, commit_message, create_pr)
