"""`diffusers_custom_vae.loading.load_vae`: any VAE the package works with (CustomVAE, diffusers' AutoencoderKL), from
a folder, a pipeline's subfolder or the Hub cache, loaded as strictly as CustomVAE itself."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from test_loading import make_hub_cache
from tiny_pipelines import tiny_autoencoder_kl, tiny_pipeline

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.loading import load_vae, vae_class

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def autoencoder_kl() -> AutoencoderKL:
    return tiny_autoencoder_kl().eval()


@pytest.fixture
def saved_akl(tmp_path, autoencoder_kl) -> Path:
    folder = tmp_path / "akl"
    autoencoder_kl.save_pretrained(folder)
    return folder


def edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / WEIGHTS)
    edit(state)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def assert_same_weights(vae, expected):
    state, expected_state = vae.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    assert [name for name in state if not torch.equal(state[name], expected_state[name])] == []


def test_each_class_loads_as_itself(tmp_path, saved_akl, autoencoder_kl, tiny_vae):
    tiny_vae.save_pretrained(tmp_path / "custom")
    custom = load_vae(tmp_path / "custom")
    assert type(custom) is CustomVAE and not custom.training
    assert_same_weights(custom, tiny_vae)
    akl = load_vae(str(saved_akl), torch_dtype=torch.float16)
    assert type(akl) is AutoencoderKL and akl.dtype == torch.float16
    assert_same_weights(akl, autoencoder_kl.half())
    akl, info = load_vae(saved_akl, output_loading_info=True)
    assert type(akl) is AutoencoderKL and akl.config._class_name == "AutoencoderKL" and not info["missing_keys"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.pop("decoder.conv_out.bias"), "config.json.*missing.*decoder.conv_out.bias"),
        (
            lambda state: state["encoder.conv_in.weight"].view(-1).__setitem__(0, float("nan")),
            r"NaN or inf.*encoder.conv_in.weight",
        ),
        (
            lambda state: state.update({"decoder.conv_out.weight": state["decoder.conv_out.weight"].to(torch.int8)}),
            r"floating-point.*decoder.conv_out.weight \(torch.int8\)",
        ),
    ],
    ids=["missing", "nan", "int8"],
)
def test_autoencoder_kl_is_loaded_as_strictly_as_custom_vae(saved_akl, edit, message):
    """diffusers' own loader leaves a missing AutoencoderKL weight random and loads NaN: metrics would be garbage."""
    edit_weights(saved_akl, edit)
    AutoencoderKL.from_pretrained(saved_akl)  # no error from diffusers' loader
    with pytest.raises(ValueError, match=message):
        load_vae(saved_akl)


def test_autoencoder_kl_config_that_does_not_fit_its_weights(saved_akl):
    config = json.loads((saved_akl / "config.json").read_text())
    (saved_akl / "config.json").write_text(json.dumps({**config, "latent_channels": 3}))
    with pytest.raises(ValueError, match="config.json.*mismatched.*conv_in"):
        load_vae(saved_akl)


def test_deprecated_attention_names_of_old_autoencoder_kl_checkpoints_still_load(saved_akl, autoencoder_kl):
    """Old SD VAE checkpoints name attention weights query/key/value/proj_attn; diffusers renames them on load."""
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(state):
        for name in list(state):
            for new, old in old_names.items():
                if f".attentions.0.{new}." in name:
                    state[name.replace(f".{new}.", f".{old}.")] = state.pop(name)

    edit_weights(saved_akl, rename)
    assert any(".query." in name for name in load_file(saved_akl / WEIGHTS))
    assert_same_weights(load_vae(saved_akl), autoencoder_kl)


def test_a_model_that_is_not_a_vae_is_named(tmp_path):
    tiny_pipeline().unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="unet.*UNet2DConditionModel.*CustomVAE or AutoencoderKL"):
        load_vae(tmp_path / "unet")
    with pytest.raises(ValueError, match="model.json.*UNet2DConditionModel"):
        vae_class({"_class_name": "UNet2DConditionModel"}, "model.json")


def test_a_folder_without_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=re.escape(str(tmp_path / "empty")) + ".*config.json"):
        load_vae(tmp_path / "empty")


def test_the_vae_of_a_pipeline_folder_by_subfolder(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(OSError, match="pipeline.*subfolder='vae'"):
        load_vae(tmp_path / "pipe")
    assert_same_weights(load_vae(tmp_path / "pipe", subfolder="vae"), pipe.vae)


def test_a_repo_id_loads_from_the_hub_cache_offline(tmp_path, saved_akl, autoencoder_kl, network_attempts):
    cache = make_hub_cache(tmp_path / "cache", saved_akl, repo_id="user/akl")
    assert_same_weights(load_vae("user/akl", cache_dir=cache), autoencoder_kl)
    assert network_attempts == []


@pytest.mark.parametrize("path", ["/no/such/vae", "./no-such-vae", "~/no-such-vae"])
def test_a_path_that_is_not_a_folder_says_so_without_asking_the_hub(path, network_attempts):
    with pytest.raises(FileNotFoundError, match=re.escape(path) + ".*not a folder"):
        load_vae(path)
    assert not network_attempts
