"""Checkpoints saved with the tutorial's own classes -> `CustomVAE`."""

import os
import pickle

import torch

from .modeling_custom_vae import CustomVAE, unsafe_pickle_globals, weight_value_problem

# Containers that training scripts commonly wrap a state_dict in, and prefixes that wrappers add to its keys.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "vae")
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_WEIGHTS_NAME = "diffusion_pytorch_model"  # what save_pretrained names weight files, with or without shards


def load_tutorial_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a `.pt`/`.pth` state_dict of the tutorial's `VAE` safely (`weights_only=True`, no code runs).

    Unwraps `{"state_dict": ...}`-style containers and strips `module.` / `_orig_mod.` key prefixes. Refuses
    pickles of anything but tensors, and tensors that are not floating point or not finite.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is a folder, not a checkpoint file (.pt/.pth).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files: name the file and the likely cause
        # torch's own message suggests weights_only=False, the very thing that would run the file's code.
        names = unsafe_pickle_globals(path)  # None where torch cannot list them: older formats, plain pickles
        if isinstance(error, pickle.UnpicklingError) and (names or (names is None and _is_pickle(path))):
            refers_to = f": it refers to {', '.join(names[:5])}" if names else ""
            raise ValueError(
                f"{path!r} is a pickle that torch.load(weights_only=True) cannot read as tensors{refers_to}. Loading "
                "it in full could run arbitrary code, so it was refused for safety, not read. If you trust it and it "
                "holds the model (torch.save(model)), load it yourself and re-save the weights with "
                "torch.save(model.state_dict(), path)."
            ) from None
        detail = "" if isinstance(error, pickle.UnpicklingError) else str(error).strip().split("\n")[0].split(". ")[0]
        raise ValueError(
            f"{path!r} is truncated or not a PyTorch checkpoint ({type(error).__name__}{': ' if detail else ''}"
            f"{detail})."
        ) from error
    for key in _CONTAINER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path!r} does not hold a state_dict (a dict of tensors).")
    # load_state_dict would cast integer (e.g. quantized) weights to float without a word, and copy NaN as is.
    problems = {name: weight_value_problem(tensor) for name, tensor in checkpoint.items()}
    not_float = [
        f"{name} ({checkpoint[name].dtype})" for name, kind in problems.items() if kind == "not floating-point"
    ]
    if not_float:
        raise ValueError(
            f"{path!r} holds tensors that are not floating point: {_some(sorted(not_float))}. The tutorial's weights "
            "are float; casting these would change their meaning (a quantized checkpoint needs dequantizing first)."
        )
    not_finite = sorted(name for name, kind in problems.items() if kind == "not finite")
    if not_finite:
        raise ValueError(
            f"{path!r} has NaN or infinite values in {_some(not_finite)}: the training that saved it diverged. "
            "Convert an earlier checkpoint."
        )
    state_dict = {}
    for name, tensor in checkpoint.items():
        for prefix in _KEY_PREFIXES:
            name = name.removeprefix(prefix)
        state_dict[name] = tensor
    return state_dict


def _some(names: list[str], limit: int = 5) -> str:
    return str(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_pickle(path: str) -> bool:
    """Whether the file starts as a pickle of protocol 2 or later does (torch.save's older format, pickle.dump)."""
    with open(path, "rb") as file:
        return file.read(1) == pickle.PROTO


def convert_tutorial_checkpoint(
    checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike | None = None, **config
) -> CustomVAE:
    r"""
    Load a state_dict saved from the tutorial's `VAE` into a `CustomVAE`, and optionally save it with
    `save_pretrained`.

    Args:
        checkpoint_path (`str` or `os.PathLike`): The `.pt`/`.pth` file (loaded with `weights_only=True`).
        output_dir (`str` or `os.PathLike`, *optional*): Where to `save_pretrained` the converted model.
        **config: `CustomVAE` config overrides (e.g. `scaling_factor`). Image and latent channel counts are read from
            the weights; everything else defaults to the tutorial's architecture.

    Returns:
        `CustomVAE`: the converted model, in eval mode.

    Raises `FileExistsError`, before reading anything, when `output_dir` is a file or lies inside one, or already
    holds a saved model (nothing is overwritten); `ValueError` when the checkpoint is not the tutorial's weights.
    """
    if output_dir is not None:
        _check_output_dir(output_dir)
    state_dict = load_tutorial_state_dict(checkpoint_path)
    shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
    try:
        config = {
            "in_channels": shapes["encoder.conv_in.weight"][1],
            "latent_channels": shapes["encoder.conv_out.weight"][0] // 2,
            "out_channels": shapes["decoder.conv_out.weight"][0],
            **config,
        }
    except KeyError as error:
        raise ValueError(
            f"{os.fspath(checkpoint_path)!r} is not a checkpoint of the tutorial's VAE: it has no {error.args[0]!r}."
        ) from None
    vae = CustomVAE(**config)
    expected = vae.state_dict()
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong_shape = [
        f"{n} {shapes[n]} vs {tuple(expected[n].shape)}"
        for n in expected
        if n in shapes and shapes[n] != tuple(expected[n].shape)
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{os.fspath(checkpoint_path)!r} does not match CustomVAE({config}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches (checkpoint vs model) {wrong_shape[:5]}."
        )
    vae.load_state_dict(state_dict, strict=True)
    vae.eval()
    if output_dir is not None:
        vae.save_pretrained(output_dir)
    return vae


def _check_output_dir(output_dir: str | os.PathLike):
    """Refuses a folder that `save_pretrained` would not write (a file, where it only logs an error and returns, or
    a path inside a file), or that already holds a saved model, which it would overwrite."""
    path = os.path.abspath(output_dir)
    nearest = path
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise FileExistsError(
            f"Cannot write the model to {os.fspath(output_dir)!r}: {nearest!r} is a file, not a folder."
        )
    if nearest == path:
        saved = sorted(name for name in os.listdir(path) if name == "config.json" or name.startswith(_WEIGHTS_NAME))
        if saved:
            raise FileExistsError(
                f"{os.fspath(output_dir)!r} already holds a saved model ({', '.join(saved)}), which converting into "
                "it would overwrite: choose another folder, or remove those files first."
            )
