"""Loading without the package: a saved CustomVAE, and a pipeline saved by `save_pipeline`, load through diffusers'
remote code (`trust_remote_code=True`) in a Python where `import diffusers_custom_vae` fails, from local folders and
from the Hugging Face cache offline. Each check runs in a fresh interpreter that blocks the package and the network
and writes what it got to a file the test compares."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_loading import edit_weights, make_hub_cache
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


def run_without_package(script: str, tmp_path: Path, cache: Path | None = None) -> dict:
    """Runs `script` after WITHOUT_PACKAGE, offline, in `tmp_path`; returns the JSON it writes to `result.json`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("HF_HOME", None)
    if cache is not None:
        env["HF_HUB_CACHE"] = str(cache)
    code = WITHOUT_PACKAGE + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


def test_save_pretrained_writes_the_modeling_file_and_auto_map(tmp_path, tiny_vae, capfd):
    tiny_vae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_custom_vae.CustomVAE"}
    assert (tmp_path / "modeling_custom_vae.py").read_bytes() == Path(modeling.__file__).read_bytes()
    loaded = CustomVAE.from_pretrained(tmp_path)
    assert "auto_map" not in loaded.config
    assert "not expected" not in capfd.readouterr().err  # no warning that the config has an unknown attribute


def test_automodel_loads_a_saved_vae_without_the_package(tmp_path, tiny_vae):
    """From a folder and from the Hub cache; strict there too; a clear error without trust_remote_code."""
    tiny_vae.save_pretrained(tmp_path / "dog-vae")
    cache = make_hub_cache(tmp_path / "cache", tmp_path / "dog-vae")
    (tmp_path / "nan-vae").mkdir()
    for file in (tmp_path / "dog-vae").iterdir():
        (tmp_path / "nan-vae" / file.name).write_bytes(file.read_bytes())
    edit_weights(tmp_path / "nan-vae", lambda state: state["decoder.conv_in.bias"].fill_(float("nan")))
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_file({"x": x}, tmp_path / "x.safetensors")

    result = run_without_package(
        """
        import json, torch
        from diffusers import AutoModel
        from huggingface_hub import snapshot_download
        from safetensors.torch import load_file, save_file

        result, x = {}, load_file("x.safetensors")["x"]
        try:
            AutoModel.from_pretrained("dog-vae")
        except ValueError as error:
            result["without_trust"] = str(error)
        vae = AutoModel.from_pretrained("dog-vae", trust_remote_code=True)
        result["class"] = f"{type(vae).__module__}.{type(vae).__name__}"
        result["card_renderer"] = repr(type(vae).model_card_renderer)
        folder = snapshot_download("user/dog-vae")  # offline: the cached snapshot
        from_cache = AutoModel.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            save_file({"folder": vae(x).sample, "cache": from_cache(x).sample}, "outputs.safetensors")
        try:
            AutoModel.from_pretrained("nan-vae", trust_remote_code=True)
        except ValueError as error:
            result["nan"] = str(error)
        try:  # diffusers 0.42.1 asks the Hub for the repo's commit before it reads cached remote code
            AutoModel.from_pretrained("user/dog-vae", trust_remote_code=True)
            result["repo_id"] = "loaded"
        except Exception as error:
            result["repo_id"] = type(error).__name__
        json.dump(result, open("result.json", "w"))
        """,
        tmp_path,
        cache,
    )
    assert "Pass `trust_remote_code=True`" in result["without_trust"]
    assert result["class"].startswith("diffusers_modules.")  # diffusers' module for remote code, not the package
    assert result["class"].endswith(".modeling_custom_vae.CustomVAE")
    assert result["card_renderer"] == "None"  # so its push_to_hub falls back to diffusers' own
    with torch.no_grad():
        expected = tiny_vae(x).sample
    outputs = load_file(tmp_path / "outputs.safetensors")
    assert torch.equal(outputs["folder"], expected) and torch.equal(outputs["cache"], expected)
    assert "NaN or inf weights in ['decoder.conv_in.bias']" in result["nan"]
    # When diffusers reads cached remote code by repo id offline, this fails: update the README's Compatibility.
    assert result["repo_id"] == "OfflineModeIsEnabled"


def test_a_pipeline_saved_by_save_pipeline_loads_without_the_package(tmp_path):
    """By folder and by repo id from the Hub cache: the case diffusers issue 6563 breaks for `pipe.save_pretrained`."""
    pipe = tiny_pipeline()
    with pytest.warns(LatentSpaceWarning):
        swap_vae(pipe, tiny_custom_vae())
    with pytest.raises(ValueError, match="upload with diffusers_custom_vae.push_pipeline_to_hub"):
        save_pipeline(pipe, tmp_path / "dog-pipe", push_to_hub=True)  # would upload before model_index.json is fixed
    save_pipeline(pipe, tmp_path / "dog-pipe")
    index = json.loads((tmp_path / "dog-pipe" / "model_index.json").read_text())
    assert index["vae"] == ["modeling_custom_vae", "CustomVAE"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    cache = make_hub_cache(tmp_path / "cache", tmp_path / "dog-pipe", repo_id="user/dog-pipe")
    generation = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    expected = pipe("a dog", generator=torch.Generator().manual_seed(0), **generation).images

    result = run_without_package(
        f"""
        import json, numpy as np, torch
        from diffusers import DiffusionPipeline

        result, images = {{}}, {{}}
        try:
            DiffusionPipeline.from_pretrained("dog-pipe")
        except ValueError as error:
            result["without_trust"] = str(error)
        for name, source in (("folder", "dog-pipe"), ("cache", "user/dog-pipe")):
            pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            result[name] = f"{{type(pipe).__name__}} {{type(pipe.vae).__module__}}.{{type(pipe.vae).__name__}}"
            generator = torch.Generator().manual_seed(0)
            images[name] = pipe("a dog", generator=generator, **{generation!r}).images
        np.savez("images.npz", **images)
        json.dump(result, open("result.json", "w"))
        """,
        tmp_path,
        cache,
    )
    assert "trust_remote_code=True" in result["without_trust"]
    images = np.load(tmp_path / "images.npz")
    for name in ("folder", "cache"):
        assert result[name].startswith("StableDiffusionPipeline ") and result[name].endswith(
            "modeling_custom_vae.CustomVAE"
        )
        np.testing.assert_allclose(images[name], expected, atol=1e-6)
