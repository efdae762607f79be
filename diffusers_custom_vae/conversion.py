"""Checkpoints saved with the tutorial's own classes -> `CustomVAE`."""

import os
import pickle

import torch

from .modeling_custom_vae import CustomVAE

# Containers that training scripts commonly wrap a state_dict in, and prefixes that wrappers add to its keys.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "vae")
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def load_tutorial_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a `.pt`/`.pth` state_dict of the tutorial's `VAE` safely (`weights_only=True`, no code runs).

    Unwraps `{"state_dict": ...}`-style containers and strips `module.` / `_orig_mod.` key prefixes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files: name the file and the likely cause
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
            raise ValueError(
                f"{path!r} holds pickled Python objects, not only tensors (was it saved with torch.save(model)?). "
                "Loading it could run arbitrary code, so it is refused: re-save it with "
                "torch.save(model.state_dict(), path)."
            ) from error
        raise ValueError(
            f"{path!r} is truncated or not a PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error
    for key in _CONTAINER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path!r} does not hold a state_dict (a dict of tensors).")
    state_dict = {}
    for name, tensor in checkpoint.items():
        for prefix in _KEY_PREFIXES:
            name = name.removeprefix(prefix)
        state_dict[name] = tensor
    return state_dict


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
    """
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
