"""push_to_hub and model cards, with huggingface_hub's HfApi intercepted at its boundary: no network."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from diffusers_custom_vae import CustomVAE, push_vae_to_hub, swap_vae
from diffusers_custom_vae.hub import render_model_card


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Records what would be sent to the Hub: created repos and a copy of each uploaded folder."""
    hub = SimpleNamespace(created=[], uploads=[], existing_files=set())

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        hub.created.append((repo_id, private))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message=None, create_pr=False, **kwargs):
        copy = tmp_path / f"upload{len(hub.uploads)}"
        shutil.copytree(folder_path, copy)
        hub.uploads.append(SimpleNamespace(repo_id=repo_id, folder=copy, message=commit_message, token=self.token))
        return f"https://huggingface.co/{repo_id}/commit/0123"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "file_exists", lambda self, repo_id, filename, **kw: filename in hub.existing_files)
    return hub


def test_push_to_hub_uploads_config_weights_and_card(tiny_vae, fake_hub):
    url = push_vae_to_hub(tiny_vae, "user/dog-vae", token="hf_secret")
    assert url.startswith("https://huggingface.co/user/dog-vae")
    (upload,) = fake_hub.uploads
    assert sorted(p.name for p in upload.folder.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "modeling_custom_vae.py",  # for loading without the package (tests/test_remote_code.py)
    ]
    assert upload.repo_id == "user/dog-vae" and upload.token == "hf_secret"
    card = ModelCard.load(upload.folder / "README.md")
    assert card.data.library_name == "diffusers" and "diffusers_custom_vae" in card.data.tags
    assert "import diffusers_custom_vae" in card.text and 'CustomVAE.from_pretrained("user/dog-vae")' in card.text
    assert 'AutoModel.from_pretrained("user/dog-vae", trust_remote_code=True)' in card.text
    reloaded = CustomVAE.from_pretrained(upload.folder)
    for name, tensor in tiny_vae.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_push_to_hub_keeps_a_card_already_in_the_repo(tiny_vae, fake_hub):
    fake_hub.existing_files.add("README.md")
    push_vae_to_hub(tiny_vae, "user/dog-vae")
    assert not (fake_hub.uploads[0].folder / "README.md").exists()
    push_vae_to_hub(tiny_vae, "user/dog-vae", model_card=render_model_card(tiny_vae, metrics={"psnr": 30.0}))
    assert "| psnr | 30 |" in (fake_hub.uploads[1].folder / "README.md").read_text()


def test_push_to_hub_with_fp16_variant(tiny_vae, fake_hub):
    push_vae_to_hub(tiny_vae, "user/dog-vae", variant="fp16")
    names = {p.name for p in fake_hub.uploads[0].folder.iterdir()}
    assert "diffusion_pytorch_model.fp16.safetensors" in names


def test_model_card_metadata_metrics_and_grid(tiny_vae):
    card = render_model_card(
        tiny_vae,
        repo_id="user/dog-vae",
        metrics={"psnr": 24.51234, "ssim": 0.7123, "ms_ssim": 0.9},
        metrics_resolution="256x256",
        grid_image="reconstructions.png",
        datasets=["user/dogs"],
        license="cc-by-4.0",
    )
    assert card.data.license == "cc-by-4.0" and card.data.datasets == ["user/dogs"]
    assert card.data.metrics == ["ms_ssim", "psnr", "ssim"]
    assert "| psnr | 24.51 |" in card.text and "at 256x256" in card.text
    assert "![reconstructions](reconstructions.png)" in card.text
    assert "its own latent space" in card.text  # from scratch: the card warns that SD UNets won't work with it
    parameters = sum(p.numel() for p in tiny_vae.parameters()) / 1e6
    assert f"{parameters:.2f}M parameters" in card.text and "2x downsampling" in card.text


def test_the_models_own_push_to_hub_is_diffusers(tiny_vae, fake_hub, monkeypatch):
    """`vae.push_to_hub` is diffusers' (it saves through save_pretrained, modeling file included, with diffusers'
    generic card), in the package as in remote code; the package's card comes with `push_vae_to_hub`."""
    from diffusers import ModelMixin

    pushed = []
    monkeypatch.setattr(ModelMixin, "push_to_hub", lambda self, repo_id, **kw: pushed.append((repo_id, kw)) or "url")
    assert tiny_vae.push_to_hub("user/dog-vae", token="hf_secret", variant="fp16") == "url"
    assert pushed == [("user/dog-vae", dict(token="hf_secret", variant="fp16"))]
    assert fake_hub.uploads == []
    push_vae_to_hub(tiny_vae, "user/dog-vae", model_card=ModelCard("---\nlicense: mit\n---\n# My card"))
    assert "# My card" in (fake_hub.uploads[0].folder / "README.md").read_text()


def test_push_pipeline_to_hub_uploads_what_loads_without_the_package(fake_hub):
    from tiny_pipelines import tiny_custom_vae, tiny_pipeline

    from diffusers_custom_vae import LatentSpaceWarning, push_pipeline_to_hub, swap_vae

    pipe = tiny_pipeline()
    with pytest.warns(LatentSpaceWarning):
        swap_vae(pipe, tiny_custom_vae())
    url = push_pipeline_to_hub(pipe, "user/dog-pipe", token="hf_secret")
    assert url.startswith("https://huggingface.co/user/dog-pipe")
    (upload,) = fake_hub.uploads
    assert upload.message == "Upload StableDiffusionPipeline" and upload.token == "hf_secret"
    index = json.loads((upload.folder / "model_index.json").read_text())
    assert index["vae"] == ["modeling_custom_vae", "CustomVAE"]
    assert (upload.folder / "vae" / "modeling_custom_vae.py").is_file()
    card = ModelCard.load(upload.folder / "README.md")
    assert card.data.library_name == "diffusers" and "diffusers_custom_vae" in card.data.tags
    assert 'DiffusionPipeline.from_pretrained("user/dog-pipe", trust_remote_code=True)' in card.text
    assert "latent space of its own" in card.text

    fake_hub.existing_files.add("README.md")  # a card already in the repo is kept
    push_pipeline_to_hub(pipe, "user/dog-pipe")
    assert not (fake_hub.uploads[1].folder / "README.md").exists()


def test_a_pipeline_card_describes_a_distilled_vaes_space_in_words():
    """A VAE distilled from an unnamed teacher records a fingerprint: the card says whose space it is, in words."""
    from tiny_pipelines import tiny_autoencoder_kl, tiny_custom_vae, tiny_pipeline

    from diffusers_custom_vae.hub import render_pipeline_card
    from diffusers_custom_vae.latent_spaces import encoder_fingerprint

    teacher = tiny_autoencoder_kl(scaling_factor=0.5)
    pipe = tiny_pipeline(vae=teacher)
    swap_vae(pipe, tiny_custom_vae(latent_space=encoder_fingerprint(teacher)))
    text = render_pipeline_card(pipe).text
    assert "latents live in the latent space of the VAE it was distilled from (encoder-sha256:" in text
    assert "the `encoder-sha256" not in text
