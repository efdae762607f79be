import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.tutorial import VAE
from diffusers_custom_vae import CustomVAE, convert_tutorial_checkpoint


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


class MakesAFolder:
    """Unpickling this calls os.makedirs(path): a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def pickles(folder) -> dict:
    """name -> (writes a pickle that torch.load(weights_only=True) refuses into `folder`, what the refusal names)."""
    hook, weight = MakesAFolder(folder / "pwned"), torch.zeros(2)
    return {
        "torch.save(model)": (
            lambda path, model: torch.save(model, path),  # instead of torch.save(model.state_dict(), path)
            r"benchmarks\.tutorial\.Decoder",
        ),
        "code": (lambda path, _: torch.save({"weight": weight, "hook": hook}, path), r"refers to os\.makedirs\."),
        "code, legacy format": (  # torch lists the objects of its zip archives only: the refusal names the pickle
            lambda path, _: torch.save({"weight": weight, "hook": hook}, path, _use_new_zipfile_serialization=False),
            "pickle",
        ),
        "numpy": (lambda path, _: torch.save({"weight": weight, "step": np.int64(3)}, path), "numpy"),
        "pickle.dump": (lambda path, _: path.write_bytes(pickle.dumps({"hook": hook})), "pickle"),
    }


@pytest.mark.parametrize("name", pickles(Path()))
def test_pickles_are_refused_for_safety_not_executed_nor_called_corrupt(tutorial_vae, tmp_path, name):
    write, names = pickles(tmp_path)[name]
    write(tmp_path / "checkpoint.pt", tutorial_vae)
    with pytest.raises(ValueError, match="refused for safety") as error:
        convert_tutorial_checkpoint(tmp_path / "checkpoint.pt")
    message = str(error.value)
    assert (
        re.search(names, message) and "pickle" in message and "corrupt" not in message and "truncated" not in message
    )
    assert "weights_only=False" not in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint", None], ids=["garbage", "truncated"])
def test_unreadable_files_name_the_file(tutorial_vae, tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save(tutorial_vae.state_dict(), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.pt.*truncated") as error:
        convert_tutorial_checkpoint(path)
    assert "pickle" not in str(error.value) and "weights_only=False" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        convert_tutorial_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="folder"):
        convert_tutorial_checkpoint(tmp_path)


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    state = CustomVAE(block_out_channels=(32, 64), layers_per_block=1).state_dict()
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="CustomVAE.*missing"):
        convert_tutorial_checkpoint(tmp_path / "other.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "unrelated.pt")
    with pytest.raises(ValueError, match="unrelated.pt.*encoder.conv_in.weight"):
        convert_tutorial_checkpoint(tmp_path / "unrelated.pt")


def spoiled(state_dict: dict, **replacements) -> dict:
    return {**state_dict, **{name.replace("__", "."): tensor for name, tensor in replacements.items()}}


def test_weights_that_are_not_finite_are_refused_naming_the_tensors(tutorial_vae, tmp_path):
    state_dict = tutorial_vae.state_dict()
    nan_weight = state_dict["encoder.conv_in.weight"].clone().index_fill(0, torch.tensor([0]), float("nan"))
    inf_bias = torch.full_like(state_dict["decoder.conv_out.bias"], float("inf"))
    torch.save(
        spoiled(state_dict, encoder__conv_in__weight=nan_weight, decoder__conv_out__bias=inf_bias), tmp_path / "x.pt"
    )
    with pytest.raises(ValueError, match=r"NaN.*decoder.conv_out.bias.*encoder.conv_in.weight"):
        convert_tutorial_checkpoint(tmp_path / "x.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_weights_that_are_not_floating_point_are_refused_not_cast(tutorial_vae, tmp_path, dtype):
    """int8 weights (a quantized checkpoint) were cast to float32 without a word: other values, same names."""
    state_dict = tutorial_vae.state_dict()
    bias = torch.ones_like(state_dict["decoder.conv_out.bias"], dtype=dtype)
    torch.save(spoiled(state_dict, decoder__conv_out__bias=bias), tmp_path / "quantized.pt")
    with pytest.raises(ValueError, match=rf"floating.*decoder.conv_out.bias \({dtype}\)"):
        convert_tutorial_checkpoint(tmp_path / "quantized.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_half_precision_weights_convert(tutorial_vae, tmp_path):
    torch.save({k: v.half() for k, v in tutorial_vae.state_dict().items()}, tmp_path / "half.pt")
    vae = convert_tutorial_checkpoint(tmp_path / "half.pt")
    assert torch.equal(vae.encoder.conv_in.weight, tutorial_vae.encoder.conv_in.weight.half().float())


@pytest.fixture
def checkpoint(tutorial_vae, tmp_path):
    torch.save(tutorial_vae.state_dict(), tmp_path / "tutorial.pt")
    return tmp_path / "tutorial.pt"


@pytest.mark.parametrize(
    "output, message",
    [
        ("notes.txt", r"notes.txt.*not a folder"),
        ("notes.txt/vae", r"notes.txt.*not a folder"),
        ("saved", r"saved.*config.json"),
    ],
    ids=["a file", "inside a file", "a saved model"],
)
def test_output_paths_that_would_lose_data_or_write_nothing_are_refused_first(checkpoint, tmp_path, output, message):
    """save_pretrained only logs an error when given a file: the converter reported success and wrote nothing."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text("{}")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(FileExistsError, match=message):
        convert_tutorial_checkpoint(checkpoint, tmp_path / output)
    with pytest.raises(FileExistsError, match=message):  # before anything else: the checkpoint is not even read
        convert_tutorial_checkpoint(tmp_path / "missing.pt", tmp_path / output)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_an_existing_folder_without_a_model_is_written_into(checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    convert_tutorial_checkpoint(checkpoint, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert CustomVAE.from_pretrained(tmp_path / "out").config.in_channels == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{checkpoint}", "{tmp}/notes.txt"], "notes.txt' is a file, not a folder"),
        (["{tmp}/missing.pt", "{tmp}/out"], "No checkpoint file at '.*missing.pt'"),
        (["{tmp}/code.pt", "{tmp}/out"], "code.pt' is a pickle .* refused for safety"),
        (["{tmp}/garbage.pt", "{tmp}/out"], "garbage.pt' is truncated or not a PyTorch checkpoint"),
        (["{tmp}/nan.pt", "{tmp}/out"], r"NaN or infinite values in \['encoder.conv_in.weight'\]"),
        (["{tmp}/int8.pt", "{tmp}/out"], r"not floating point: \['encoder.conv_in.weight \(torch.int8\)'\]"),
        (["{tmp}/other.pt", "{tmp}/out"], "is not a checkpoint of the tutorial's VAE"),
        (["{checkpoint}", "{tmp}/out", "--scaling_factor", "nan"], "scaling_factor must be a finite positive number"),
        (["{checkpoint}", "{tmp}/out", "--scaling_factor", "-0.2"], "scaling_factor must be a finite positive number"),
    ],
    ids=[
        "output is a file",
        "missing",
        "pickle",
        "garbage",
        "NaN",
        "int8",
        "other architecture",
        "nan scale",
        "negative scale",
    ],
)
def test_command_line_mistakes_end_in_one_line_and_write_nothing(
    tutorial_vae, checkpoint, tmp_path, capsys, run_example, argv, message
):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    weight = tutorial_vae.encoder.conv_in.weight.detach()
    torch.save({"weight": weight, "hook": MakesAFolder(tmp_path / "pwned")}, tmp_path / "code.pt")
    torch.save({"encoder.conv_in.weight": weight.clone().fill_(float("nan"))}, tmp_path / "nan.pt")
    torch.save({"encoder.conv_in.weight": weight.to(torch.int8)}, tmp_path / "int8.pt")
    torch.save({"weight": weight}, tmp_path / "other.pt")
    before = {path: path.read_bytes() if path.is_file() else None for path in tmp_path.rglob("*")}
    with pytest.raises(SystemExit) as exit_info:
        run_example("convert_tutorial_checkpoint", [arg.format(checkpoint=checkpoint, tmp=tmp_path) for arg in argv])
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and out == "" and "Traceback" not in err, err
    assert len(error_lines) == 1 and re.search(f"error: .*{message}", error_lines[0]), err
    assert {path: path.read_bytes() if path.is_file() else None for path in tmp_path.rglob("*")} == before
