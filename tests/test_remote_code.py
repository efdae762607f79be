"""Loading without the package: a saved CustomVAE, and a pipeline saved by `save_pipeline`, load through diffusers'
remote code (`trust_remote_code=True`) in a Python where `import diffusers_custom_vae` fails, from local folders and
from the Hugging Face cache offline. One fresh interpreter, which blocks the package and the network, loads everything
(a subprocess costs seconds) and writes what it got to files the tests compare."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines import pipeline_utils
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file
from test_loading import COMMIT, edit_weights, make_hub_cache
from tiny_pipelines import tiny_custom_vae, tiny_pipeline

from diffusers_custom_vae import CustomVAE, LatentSpaceWarning, save_pipeline, swap_vae
from diffusers_custom_vae import modeling_custom_vae as modeling

# Run first in each interpreter: the package cannot be imported (as if not installed), nor the network reached.
WITHOUT_PACKAGE = """
import importlib.abc, socket, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "diffusers_custom_vae":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, BlockPackage())
try:
    import diffusers_custom_vae
    sys.exit("diffusers_custom_vae was importable")
except ModuleNotFoundError:
    pass

def refuse(*args, **kwargs):
    raise RuntimeError(f"network access attempted: {args}")

socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse

import torch
torch.set_num_threads(1)  # as in conftest, so results are bit-equal to the test's own
"""


def test_save_pretrained_writes_the_modeling_file_and_auto_map(tmp_path, tiny_vae, capfd):
    tiny_vae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_custom_vae.CustomVAE"}
    assert (tmp_path / "modeling_custom_vae.py").read_bytes() == Path(modeling.__file__).read_bytes()
    loaded = CustomVAE.from_pretrained(tmp_path)
    assert "auto_map" not in loaded.config
    assert "not expected" not in capfd.readouterr().err  # no warning that the config has an unknown attribute


def test_save_pipeline_names_the_vae_by_its_modeling_file(tmp_path):
    pipe = tiny_pipeline()
    with pytest.warns(LatentSpaceWarning):
        swap_vae(pipe, tiny_custom_vae())
    with pytest.raises(ValueError, match="push_pipeline_to_hub"):
        save_pipeline(pipe, tmp_path, push_to_hub=True)  # would upload before model_index.json is fixed
    with pytest.raises(TypeError, match="pipe.*CustomVAE"):
        save_pipeline(pipe.vae, tmp_path)  # wrote the VAE's folder, then failed on the missing model_index.json
    assert list(tmp_path.iterdir()) == []
    save_pipeline(pipe, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["modeling_custom_vae", "CustomVAE"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "vae" / "modeling_custom_vae.py").is_file()


# What the interpreter without the package runs, in a folder holding: dog-vae/ (a CustomVAE), nan-vae/ (the same
# with a NaN weight), dog-pipe/ (a pipeline saved by save_pipeline), x.safetensors (images), and a Hub cache holding
# user/dog-vae and user/dog-pipe. It writes result.json, vae_outputs.safetensors and pipe_images.npz.
SCRIPT = """
import json, numpy as np, torch
from diffusers import AutoModel, DiffusionPipeline
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file

result = {}
for name, load in (("vae", AutoModel.from_pretrained), ("pipe", DiffusionPipeline.from_pretrained)):
    try:
        load(f"dog-{name}")
    except ValueError as error:
        result[f"{name}_without_trust"] = str(error)

vae = AutoModel.from_pretrained("dog-vae", trust_remote_code=True)
result["vae_class"] = f"{type(vae).__module__}.{type(vae).__name__}"
cached_vae = AutoModel.from_pretrained(snapshot_download("user/dog-vae"), trust_remote_code=True)  # offline: cached
x = load_file("x.safetensors")["x"]
with torch.no_grad():
    save_file({"folder": vae(x).sample, "cache": cached_vae(x).sample}, "vae_outputs.safetensors")
try:
    AutoModel.from_pretrained("nan-vae", trust_remote_code=True)
except ValueError as error:
    result["nan"] = str(error)
try:  # diffusers 0.42.1 asks the Hub for the repo's commit before it reads cached remote code
    AutoModel.from_pretrained("user/dog-vae", trust_remote_code=True)
    result["vae_by_repo_id"] = "loaded"
except Exception as error:
    result["vae_by_repo_id"] = type(error).__name__

images = {}
for name, source in (("folder", "dog-pipe"), ("cache", "user/dog-pipe")):
    pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    result[f"pipe_{name}"] = [type(pipe).__name__, f"{type(pipe.vae).__module__}.{type(pipe.vae).__name__}"]
    generator = torch.Generator().manual_seed(0)
    images[name] = pipe("a dog", generator=generator, **GENERATION).images
np.savez("pipe_images.npz", **images)
json.dump(result, open("result.json", "w"))
"""
GENERATION = dict(height=64, width=64, num_inference_steps=2, output_type="np")


def files_a_pipeline_download_fetches(folder: Path, repo_id: str) -> list[str]:
    """The files of a Hub repo holding `folder` that `DiffusionPipeline.from_pretrained(repo_id)` downloads the first
    time: diffusers lists the repo and downloads what its own allow and ignore patterns pass. Of a custom component's
    folder that is the weights, config.json and the one module file model_index.json names, and no other code: so
    the model file cannot import a sibling module (`from .x import y`), which would be missing there. Diffusers' Hub
    calls are faked (the repo listing is the folder's); the patterns are its own."""
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    patterns = {}

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        patterns.update(allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        return str(folder)

    with pytest.MonkeyPatch.context() as patch:
        listing = SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in files], sha=COMMIT)
        patch.setattr(pipeline_utils, "_resolve_revision", lambda repo_id, revision=None, **kwargs: revision)
        patch.setattr(pipeline_utils, "model_info", lambda repo_id, **kwargs: listing)
        patch.setattr(pipeline_utils, "hf_hub_download", lambda repo_id, filename, **kwargs: str(folder / filename))
        patch.setattr(pipeline_utils, "snapshot_download", snapshot_download)
        DiffusionPipeline.download(repo_id, local_files_only=False, force_download=True)  # force: not "cached"
    return list(filter_repo_objects(files, **patterns))


@pytest.fixture(scope="module")
def without_package(tmp_path_factory):
    """Runs SCRIPT once for this module's tests; returns (folder, result.json's content, the package's own outputs)."""
    folder = tmp_path_factory.mktemp("without-package")
    vae = tiny_custom_vae()
    vae.save_pretrained(folder / "dog-vae")
    vae.save_pretrained(folder / "nan-vae")
    edit_weights(folder / "nan-vae", lambda state: state["decoder.conv_in.bias"].fill_(float("nan")))
    pipe = tiny_pipeline()
    with pytest.warns(LatentSpaceWarning):
        swap_vae(pipe, tiny_custom_vae())
    save_pipeline(pipe, folder / "dog-pipe")
    make_hub_cache(folder / "cache", folder / "dog-vae", repo_id="user/dog-vae")
    # The pipeline's cache holds what DiffusionPipeline.from_pretrained("user/dog-pipe") downloads, not the whole repo.
    fetched = files_a_pipeline_download_fetches(folder / "dog-pipe", "user/dog-pipe")
    assert "vae/modeling_custom_vae.py" in fetched and "vae/diffusion_pytorch_model.safetensors" in fetched
    for name in fetched:
        (folder / "dog-pipe-fetched" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "dog-pipe" / name, folder / "dog-pipe-fetched" / name)
    make_hub_cache(folder / "cache", folder / "dog-pipe-fetched", repo_id="user/dog-pipe")
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_file({"x": x}, folder / "x.safetensors")
    with torch.no_grad():
        expected = dict(
            vae=vae(x).sample, pipe=pipe("a dog", generator=torch.Generator().manual_seed(0), **GENERATION).images
        )

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(folder / "cache")}
    env["HF_MODULES_CACHE"] = str(folder / "modules")  # where diffusers copies remote code
    env.pop("HF_HOME", None)
    code = WITHOUT_PACKAGE + f"GENERATION = {GENERATION!r}\n" + SCRIPT
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return folder, json.loads((folder / "result.json").read_text()), expected


def test_automodel_loads_a_saved_vae_without_the_package(without_package):
    """From a folder and from the Hub cache, with the package's own outputs; strict there too; a clear error without
    trust_remote_code."""
    folder, result, expected = without_package
    assert "Pass `trust_remote_code=True`" in result["vae_without_trust"]
    assert result["vae_class"].startswith("diffusers_modules.")  # diffusers' module for remote code, not the package
    assert result["vae_class"].endswith(".modeling_custom_vae.CustomVAE")
    outputs = load_file(folder / "vae_outputs.safetensors")
    assert torch.equal(outputs["folder"], expected["vae"]) and torch.equal(outputs["cache"], expected["vae"])
    assert "NaN or inf weights in ['decoder.conv_in.bias']" in result["nan"]
    # When diffusers reads cached remote code by repo id offline, this fails: update docs/compatibility.md.
    assert result["vae_by_repo_id"] == "OfflineModeIsEnabled"


def test_a_pipeline_saved_by_save_pipeline_loads_without_the_package(without_package):
    """By folder and by repo id from the Hub cache: the case diffusers issue 6563 breaks for `pipe.save_pretrained`."""
    folder, result, expected = without_package
    assert "trust_remote_code=True" in result["pipe_without_trust"]
    images = np.load(folder / "pipe_images.npz")
    for name in ("folder", "cache"):
        pipeline_class, vae_class = result[f"pipe_{name}"]
        assert pipeline_class == "StableDiffusionPipeline"
        assert vae_class.startswith("diffusers_modules.") and vae_class.endswith(".modeling_custom_vae.CustomVAE")
        np.testing.assert_array_equal(images[name], expected["pipe"])
