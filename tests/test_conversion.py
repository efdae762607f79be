import pytest
import torch

from diffusers_custom_vae import CustomVAE, convert_tutorial_checkpoint
from diffusers_custom_vae.tutorial import VAE


@pytest.fixture(scope="module")
def tutorial_vae():
    torch.manual_seed(0)
    return VAE().eval()


def _same_outputs(tutorial_vae, vae):
    x = torch.rand(1, 3, 32, 40) * 2 - 1
    z = torch.randn(1, 4, 4, 5)
    with torch.no_grad():
        mean, logvar = tutorial_vae.encoder(x)
        posterior = vae.encode(x).latent_dist
        assert torch.allclose(posterior.mean, mean, atol=1e-5)
        assert torch.allclose(posterior.logvar, logvar.clamp(-30, 20), atol=1e-5)
        assert torch.allclose(vae.decode(z).sample, tutorial_vae.decoder(z), atol=1e-5)


def test_converted_folder_reproduces_the_tutorial_model(tutorial_vae, tmp_path, run_example):
    torch.save(tutorial_vae.state_dict(), tmp_path / "tutorial.pt")
    run_example(
        "convert_tutorial_checkpoint",
        [str(tmp_path / "tutorial.pt"), str(tmp_path / "out"), "--scaling_factor", "0.25"],
    )
    vae = CustomVAE.from_pretrained(tmp_path / "out")
    assert vae.config.scaling_factor == 0.25
    _same_outputs(tutorial_vae, vae)


def test_wrapped_and_prefixed_state_dicts_convert(tutorial_vae, tmp_path):
    """Training scripts save {"model_state_dict": ...} with DDP's "module." prefix; that must load too."""
    wrapped = {"model_state_dict": {f"module.{k}": v for k, v in tutorial_vae.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    _same_outputs(tutorial_vae, convert_tutorial_checkpoint(tmp_path / "wrapped.pth"))


def test_channel_counts_are_read_from_the_weights(tmp_path):
    torch.save(VAE(channels=1, latent_dim=8).state_dict(), tmp_path / "grey.pt")
    vae = convert_tutorial_checkpoint(tmp_path / "grey.pt")
    assert (vae.config.in_channels, vae.config.out_channels, vae.config.latent_channels) == (1, 1, 8)


def test_pickled_modules_are_refused_not_executed(tutorial_vae, tmp_path):
    torch.save(tutorial_vae, tmp_path / "whole_model.pt")
    with pytest.raises(ValueError, match="pickled Python objects"):
        convert_tutorial_checkpoint(tmp_path / "whole_model.pt")


@pytest.mark.parametrize("content", [b"not a checkpoint", None], ids=["garbage", "truncated"])
def test_unreadable_files_name_the_file(tutorial_vae, tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save(tutorial_vae.state_dict(), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.pt.*truncated or not a PyTorch checkpoint"):
        convert_tutorial_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        convert_tutorial_checkpoint(tmp_path / "missing.pt")


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    state = CustomVAE(block_out_channels=(32, 64), layers_per_block=1).state_dict()
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not match CustomVAE.*missing"):
        convert_tutorial_checkpoint(tmp_path / "other.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "unrelated.pt")
    with pytest.raises(ValueError, match="not a checkpoint of the tutorial's VAE"):
        convert_tutorial_checkpoint(tmp_path / "unrelated.pt")
