"""Persistence and the Hub: save_pretrained/from_pretrained round trips, loading a repo id through the Hugging Face
cache with no network, and checkpoints that must fail loudly instead of loading random or meta-device weights."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_custom_vae import CustomVAE

WEIGHTS = "diffusion_pytorch_model.safetensors"
COMMIT = "6dd927e8f7109261a3c0b6d2e4f5a1b9c8d7e6f5"  # any 40 hex digits: the snapshot folder's name


@pytest.fixture
def saved(tmp_path, tiny_vae) -> Path:
    folder = tmp_path / "dog-vae"
    tiny_vae.save_pretrained(folder)
    return folder


def public_config(vae: CustomVAE) -> dict:
    """The config as a user sees it (tuples come back from JSON as lists; private keys record provenance)."""
    public = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in public.items()}


def assert_same_weights(vae: CustomVAE, expected: CustomVAE):
    state, expected_state = vae.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    different = [name for name in state if not torch.equal(state[name], expected_state[name])]
    assert different == []


def make_hub_cache(cache: Path, saved_folder: Path, repo_id: str = "user/dog-vae") -> Path:
    """Lays `saved_folder` (subfolders included) out as huggingface_hub's cache does:
    models--user--dog-vae/{refs/main, blobs/<sha256>, snapshots/<commit>/<path> -> ../../blobs/<sha256>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    for file in sorted(path for path in saved_folder.rglob("*") if path.is_file()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snapshot / file.relative_to(saved_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(os.path.relpath(repo / "blobs" / blob, link.parent)))
    return cache


def edit_weights(folder: Path, edit) -> None:
    path = folder / WEIGHTS
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---------------------------------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact(saved, tiny_vae):
    assert sorted(os.listdir(saved)) == ["config.json", WEIGHTS, "modeling_custom_vae.py"]
    loaded, info = CustomVAE.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert public_config(loaded) == public_config(tiny_vae)
    assert_same_weights(loaded, tiny_vae)
    x = torch.rand(1, 3, 8, 12) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, sample_posterior=False).sample, tiny_vae(x, sample_posterior=False).sample)


def test_torch_dtype_loads_float16(saved, tiny_vae):
    loaded = CustomVAE.from_pretrained(saved, torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    assert_same_weights(loaded, tiny_vae.half())


def test_fp16_variant_is_saved_and_picked(saved, tiny_config, tiny_vae):
    torch.manual_seed(1)
    other = CustomVAE(**tiny_config).half()  # different weights, so the file that was read can be told apart
    other.save_pretrained(saved, variant="fp16")
    assert sorted(os.listdir(saved)) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        WEIGHTS,
        "modeling_custom_vae.py",
    ]

    variant = CustomVAE.from_pretrained(saved, variant="fp16", torch_dtype=torch.float16)
    assert variant.dtype == torch.float16
    assert_same_weights(variant, other)
    assert_same_weights(CustomVAE.from_pretrained(saved), tiny_vae)


# ---------------------------------------------------------------------------------------------------- the Hub cache


def test_repo_id_loads_from_the_cache_offline(tmp_path, saved, tiny_vae, network_attempts):
    cache = make_hub_cache(tmp_path / "cache", saved)
    loaded = CustomVAE.from_pretrained("user/dog-vae", cache_dir=cache)
    assert network_attempts == []
    assert_same_weights(loaded, tiny_vae)
    assert public_config(loaded) == public_config(tiny_vae)


def test_network_guard_catches_hub_calls(tmp_path, saved, network_attempts, monkeypatch):
    # Online, the same load asks the Hub first: the guard refuses it, so the offline test above would fail too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cache = make_hub_cache(tmp_path / "cache", saved)
    with pytest.raises(RuntimeError, match="network access attempted"):
        CustomVAE.from_pretrained("user/dog-vae", cache_dir=cache)
    assert network_attempts


def test_repo_id_missing_from_the_cache_is_an_oserror(tmp_path, saved, network_attempts):
    cache = make_hub_cache(tmp_path / "cache", saved)
    with pytest.raises(OSError, match="user/cat-vae"):
        CustomVAE.from_pretrained("user/cat-vae", cache_dir=cache)
    assert network_attempts == []


def test_hf_hub_cache_environment_variable_is_honoured(tmp_path, saved, tiny_vae):
    # HF_HUB_CACHE is read at import time, so a fresh interpreter gets it; it refuses any network access itself.
    cache = make_hub_cache(tmp_path / "cache", saved)
    copy = tmp_path / "loaded.safetensors"
    script = textwrap.dedent(f"""
        import socket
        def refuse(*args, **kwargs):
            raise RuntimeError(f"network access attempted: {{args}}")
        socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse
        from safetensors.torch import save_file
        from diffusers_custom_vae import CustomVAE
        vae = CustomVAE.from_pretrained("user/dog-vae")
        save_file(vae.state_dict(), {str(copy)!r})
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = load_file(copy)
    assert loaded.keys() == tiny_vae.state_dict().keys()
    assert all(torch.equal(tensor, tiny_vae.state_dict()[name]) for name, tensor in loaded.items())


# ---------------------------------------------------------------------------------------------------- bad checkpoints


def test_missing_weights_file_is_an_oserror(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        CustomVAE.from_pretrained(saved)


@pytest.mark.parametrize("kept", [0.5, 0.01], ids=["half", "header-only"])
def test_truncated_weights_file_is_an_oserror(saved, kept):
    path = saved / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(OSError, match=WEIGHTS) as error:
        CustomVAE.from_pretrained(saved)
    assert "truncated" in str(error.value).replace(str(saved), "")  # said, not only in this test's folder name


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(latent_channels=3), "conv_in.weight"),  # same modules, other shapes
        (dict(layers_per_block=2), "decoder.blocks"),  # other modules at the same names
        (dict(mid_block_add_attention=False), "mismatched shapes"),  # fewer modules: later ones shift onto others
    ],
    ids=["latent-channels", "layers-per-block", "no-attention"],
)
def test_config_that_does_not_match_the_weights_is_a_valueerror(saved, changes, named):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match="config.json") as error:
        CustomVAE.from_pretrained(saved)
    assert named in str(error.value)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_missing_and_unexpected_keys_are_listed(saved, low_cpu_mem_usage):
    def edit(state):
        del state["decoder.conv_out.bias"]
        state["decoder.extra.weight"] = torch.zeros(2)

    edit_weights(saved, edit)
    with pytest.raises(ValueError, match="missing.*decoder.conv_out.bias.*unexpected.*decoder.extra.weight"):
        CustomVAE.from_pretrained(saved, low_cpu_mem_usage=low_cpu_mem_usage)


def test_config_mismatch_is_a_valueerror_without_low_cpu_mem_usage(saved):
    edit_config(saved, latent_channels=3)
    with pytest.raises(ValueError, match="config.json.*conv_in"):
        CustomVAE.from_pretrained(saved, low_cpu_mem_usage=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_valueerror(saved, value):
    def edit(state):
        state["encoder.conv_in.weight"][0, 0, 0, 0] = value

    edit_weights(saved, edit)
    with pytest.raises(ValueError, match=r"NaN or inf.*encoder.conv_in.weight"):
        CustomVAE.from_pretrained(saved)


def test_folder_that_does_not_exist_is_an_oserror(tmp_path, network_attempts):
    with pytest.raises(OSError, match="no-such-folder"):
        CustomVAE.from_pretrained(tmp_path / "no-such-folder")
    assert network_attempts == []


def test_weights_are_checked_before_diffusers_loads_them(saved, monkeypatch):
    """The checks see what diffusers read before its loader casts, places or warns about any weight: they neither
    match nor need the words of its errors."""
    from diffusers import ModelMixin

    def reworded(cls, *args, **kwargs):
        raise RuntimeError("a message diffusers never wrote")

    monkeypatch.setattr(ModelMixin, "_load_pretrained_model", classmethod(reworded))
    with pytest.raises(RuntimeError, match="never wrote"):  # nothing wrong in the files: diffusers' error stands
        CustomVAE.from_pretrained(saved)
    edit_config(saved, latent_channels=3)
    with pytest.raises(ValueError, match="config.json.*conv_in.weight"):
        CustomVAE.from_pretrained(saved)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64], ids=["int8", "bool", "int64"])
@pytest.mark.parametrize("torch_dtype", [None, torch.float16], ids=["as-saved", "float16"])
def test_weights_that_are_not_floating_point_are_refused(saved, dtype, torch_dtype):
    def edit(state):
        state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].to(dtype)

    edit_weights(saved, edit)
    with pytest.raises(ValueError, match=rf"floating-point.*decoder.conv_out.weight \({dtype}\)"):
        CustomVAE.from_pretrained(saved, torch_dtype=torch_dtype)


def test_weights_that_overflow_torch_dtype_are_refused(saved):
    def edit(state):
        state["encoder.conv_out.bias"][0] = 1e6  # finite in float32, inf in float16 (largest: 65504)

    edit_weights(saved, edit)
    assert CustomVAE.from_pretrained(saved).encoder.conv_out.bias[0] == 1e6
    with pytest.raises(ValueError, match=r"inf.*encoder.conv_out.bias \(torch.float16\)"):
        CustomVAE.from_pretrained(saved, torch_dtype=torch.float16)


def save_as_pickle(folder: Path, payload) -> None:
    """Replaces the safetensors file with a `.bin` written by torch.save, which diffusers reads when no safetensors
    file is there."""
    (folder / WEIGHTS).unlink()
    torch.save(payload, folder / "diffusion_pytorch_model.bin")


def test_pickled_state_dict_loads_with_the_same_weights(saved, tiny_vae):
    save_as_pickle(saved, tiny_vae.state_dict())
    assert_same_weights(CustomVAE.from_pretrained(saved), tiny_vae)


def test_pickle_holding_python_objects_is_refused_for_safety(saved, tiny_vae):
    save_as_pickle(saved, {**tiny_vae.state_dict(), "model": torch.nn.Linear(2, 2)})
    with pytest.raises(OSError, match=r"pickle.*Linear.*safety") as error:
        CustomVAE.from_pretrained(saved)
    assert "truncated" not in str(error.value)


def test_sharded_checkpoint_is_checked_shard_by_shard(tmp_path, tiny_vae):
    tiny_vae.save_pretrained(tmp_path, max_shard_size="4KB")
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    assert_same_weights(CustomVAE.from_pretrained(tmp_path), tiny_vae)

    state = load_file(shards[-1])
    name = next(iter(state))
    state[name].view(-1)[0] = float("nan")
    save_file(state, shards[-1], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"NaN or inf.*{name}"):
        CustomVAE.from_pretrained(tmp_path)

    shards[0].write_bytes(shards[0].read_bytes()[:100])
    with pytest.raises(OSError, match=rf"{shards[0].name}: the file is truncated"):
        CustomVAE.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------- device_map


def assert_same_outputs(vae: CustomVAE, expected: CustomVAE):
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae(x).sample, expected(x).sample, rtol=0, atol=0)


@pytest.mark.parametrize(
    "device_map_kwargs",
    [
        dict(device_map="auto", max_memory={"cpu": 2_000}),  # room for no weight: all go to the disk
        dict(device_map={"encoder": "cpu", "decoder": "disk"}),
    ],
    ids=["auto-small-max-memory", "encoder-cpu-decoder-disk"],
)
def test_device_map_with_offload_gives_the_outputs_of_a_plain_load(tmp_path, saved, tiny_vae, device_map_kwargs):
    """As diffusers tests its models' CPU and disk offload: outputs identical to the model loaded whole."""
    offload_folder = tmp_path / "offload"
    vae = CustomVAE.from_pretrained(saved, offload_folder=offload_folder, **device_map_kwargs)
    assert "disk" in vae.hf_device_map.values()
    assert any(p.is_meta for p in vae.parameters())  # the offloaded weights live in offload_folder, not in memory
    assert_same_outputs(vae, tiny_vae)
    assert_same_outputs(vae, CustomVAE.from_pretrained(saved))


def test_device_map_still_refuses_missing_and_non_finite_weights(tmp_path, saved):
    def edit(state):
        del state["decoder.conv_out.bias"]
        state["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")

    edit_weights(saved, edit)
    for device_map in ("cpu", {"encoder": "cpu", "decoder": "disk"}):
        with pytest.raises(ValueError, match="missing.*decoder.conv_out.bias"):
            CustomVAE.from_pretrained(saved, device_map=device_map, offload_folder=tmp_path / "offload")

    edit_weights(saved, lambda state: state.update({"decoder.conv_out.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"NaN or inf.*encoder.conv_in.weight"):
        CustomVAE.from_pretrained(saved, device_map={"encoder": "disk", "decoder": "cpu"}, offload_folder=tmp_path)


# ---------------------------------------------------------------------------------------------------- shared checks


def test_weight_value_problem_names_each_kind():
    """One check of weight values, asked by from_pretrained, load_vae and convert_tutorial_checkpoint alike."""
    from diffusers_custom_vae.modeling_custom_vae import weight_value_problem

    assert weight_value_problem(torch.ones(2)) is None
    assert weight_value_problem(torch.ones(2, dtype=torch.int8)) == "not floating-point"
    assert weight_value_problem(torch.tensor([1.0, float("nan")])) == "not finite"
    assert weight_value_problem(torch.tensor([1e6]), torch.float16) == "overflows"
    assert weight_value_problem(torch.tensor([1e6]), torch.bfloat16) is None


def test_unsafe_pickle_globals_lists_objects_without_running_them(tmp_path, tiny_vae):
    """One pickle check, asked by from_pretrained, convert_tutorial_checkpoint and the trainer's resume alike."""
    from diffusers_custom_vae.modeling_custom_vae import unsafe_pickle_globals

    torch.save(tiny_vae.state_dict(), tmp_path / "weights.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "objects.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert unsafe_pickle_globals(tmp_path / "weights.pt") == []
    assert unsafe_pickle_globals(tmp_path / "objects.pt") == ["torch.nn.modules.linear.Linear"]
    assert unsafe_pickle_globals(tmp_path / "legacy.pt") is None  # torch lists the objects of zip archives only
