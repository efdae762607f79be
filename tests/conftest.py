import os

# Tests never touch the network: the Hub is reached only through local folders and the local cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import socket  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_custom_vae import CustomVAE  # noqa: E402

# Tiny test tensors gain nothing from threads; on a shared 2-core machine waiting threads made tests 4-5x slower.
torch.set_num_threads(1)

# 2x downsampling, 8 and 16 channels: the smallest config that still has every kind of block.
TINY_CONFIG = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, num_attention_heads=2)


@pytest.fixture
def tiny_config() -> dict:
    return dict(TINY_CONFIG)


@pytest.fixture
def tiny_vae() -> CustomVAE:
    torch.manual_seed(0)
    return CustomVAE(**TINY_CONFIG).eval()


class NetworkAttempted(RuntimeError):
    """Raised by the socket guard; not an OSError, so no HTTP client mistakes it for a flaky connection and retries."""


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Offline mode, and every name lookup or connection the test still tries, each refused at once.

    huggingface_hub reads HF_HUB_OFFLINE once, at import (`constants.is_offline_mode()` returns that value): conftest
    sets the variable before the import, and this makes sure of it whatever was imported first."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkAttempted(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture
def load_example():
    """load_example("train_vae") imports examples/train_vae.py as a module."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def run_example(load_example):
    """run_example("train_vae", ["--flag", ...]) calls examples/train_vae.py's main(argv) in this process."""
    return lambda name, argv: load_example(name).main(argv)
