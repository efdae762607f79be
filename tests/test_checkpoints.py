"""Checkpoints and the output folder lose nothing and run nothing: pruning touches only this run's checkpoints and
never the one just written, the user's own folders and files are left alone, a resume never unpickles, and a
damaged checkpoint names the intact one to resume from instead."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_custom_vae.training import checkpoint_steps
from diffusers_custom_vae.training.checkpoints import STATE_FILE, latest_checkpoint

TINY_8X = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(root / f"{index}.png")
    return root


@pytest.fixture
def train_vae(image_folder, tmp_path, run_example):
    """train_vae(output_dir, *flags): a tiny run on six small images, 2 steps, checkpoints every step."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_8X))

    def run(output_dir, *flags):
        argv = ["--model_config", str(tmp_path / "tiny.json"), "--train_data_dir", str(image_folder)]
        argv += [
            "--output_dir",
            str(output_dir),
            "--resolution",
            "16",
            "--train_batch_size",
            "2",
            "--report_to",
            "none",
        ]
        argv += ["--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "100", *flags]
        return run_example("train_vae", argv)

    return run


def error_line(capsys) -> str:
    """The one line a user's mistake ends with (after any progress bars), checked to be the only error output."""
    error = capsys.readouterr().err
    last = error.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("train_vae.py: error: ") and "Traceback" not in error, error
    return last


def earlier_runs_checkpoint(output_dir: Path, step: int = 100) -> Path:
    """A checkpoint an earlier, longer run left behind."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"run_id": "earlier", "step": step, "epoch": 9, "epoch_batches": 0}))
    os.utime(folder, (1, 1))
    return folder


def test_a_new_run_refuses_an_earlier_runs_checkpoints_before_writing_anything(train_vae, tmp_path, capsys):
    out = tmp_path / "out"
    earlier_runs_checkpoint(out)
    with pytest.raises(SystemExit):
        train_vae(out, "--checkpoints_total_limit", "1")
    error = error_line(capsys)
    assert "already holds checkpoint-100" in error and "--resume_from_checkpoint latest" in error
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-100"]


def test_pruning_never_deletes_the_checkpoint_just_written_nor_another_runs(train_vae, tmp_path, capsys):
    """With an earlier run's checkpoint-100 beside it and a limit of 1, a run keeps its own newest checkpoint, and
    `latest` resumes this run, saying that the folder also holds another run's."""
    out = tmp_path / "out"
    earlier = earlier_runs_checkpoint(out)
    train_vae(out, "--checkpoints_total_limit", "1", "--overwrite_output_dir")
    assert checkpoint_steps(out) == [2, 100] and earlier.is_dir()
    assert latest_checkpoint(out) == out / "checkpoint-2"
    capsys.readouterr()
    train_vae(out, "--checkpoints_total_limit", "1", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    output = capsys.readouterr().out
    assert (
        "Resumed from" in output
        and "checkpoint-2 at step 2" in output
        and "other runs, left alone: checkpoint-100" in output
    )
    assert checkpoint_steps(out) == [3, 100]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_checkpoint_limit_below_one_is_refused(train_vae, tmp_path, capsys, limit):
    with pytest.raises(SystemExit):
        train_vae(tmp_path / "out", "--checkpoints_total_limit", limit)
    assert f"--checkpoints_total_limit must be at least 1, got {limit}" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_the_users_own_checkpoint_like_folders_are_left_alone(train_vae, tmp_path):
    out = tmp_path / "out"
    users = ["checkpoint-2-backup", "checkpoint-7-old", "checkpoint-final.partial", "checkpoint-3.partial.keep"]
    for name in users:
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text("mine")
    train_vae(out, "--checkpoints_total_limit", "1")
    assert checkpoint_steps(out) == [2] and latest_checkpoint(out) == out / "checkpoint-2"
    assert all((out / name / "notes.txt").read_text() == "mine" for name in users)
    train_vae(out, "--checkpoints_total_limit", "1", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert checkpoint_steps(out) == [3] and all((out / name).is_dir() for name in users)


def test_the_users_files_in_the_output_folder_are_never_overwritten(train_vae, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        train_vae(out)
    assert "already holds README.md, config.json, which a new run would overwrite" in error_line(capsys)
    assert (out / "README.md").read_text() == "my notes"
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json"]


def test_an_output_folder_that_is_a_file_is_refused_before_training(train_vae, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit):
        train_vae(tmp_path / "out")
    assert "--output_dir" in error_line(capsys) and (tmp_path / "out").read_text() == "a file"


def test_resume_never_unpickles(train_vae, tmp_path, capsys):
    """A checkpoint from someone else whose optimiser file holds a pickled callable: refused, and it never runs."""
    out = tmp_path / "out"
    train_vae(out)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create `marker` if it were unpickled

    torch.save({"state": {}, "param_groups": [], "payload": Payload()}, out / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "optimizer.pt holds pickled Python objects" in error and "refused for safety" in error
    assert "checkpoint-1 is intact: resume from it with --resume_from_checkpoint" in error
    assert not marker.exists()


def test_an_accelerate_pickle_checkpoint_is_refused_not_loaded(train_vae, tmp_path, capsys):
    out = tmp_path / "out"
    old = out / "checkpoint-5"
    old.mkdir(parents=True)
    (old / "random_states_0.pkl").write_bytes(b"\x80\x04K\x01.")
    (old / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        train_vae(out, "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "checkpoint-5 was not written by this version of the trainer" in error
    assert "random_states_0.pkl" in error and "never loaded" in error


@pytest.mark.parametrize("damaged", ["model.safetensors", "scheduler.pt", STATE_FILE, "rng_state_0.pt"])
def test_a_damaged_latest_checkpoint_names_itself_and_the_intact_one_before(train_vae, tmp_path, capsys, damaged):
    out = tmp_path / "out"
    train_vae(out)
    path = out / "checkpoint-2" / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "checkpoint-2" in error and ("damaged" in error or "not written by this version" in error)
    assert (
        f"{out / 'checkpoint-1'} is intact: resume from it with --resume_from_checkpoint {out / 'checkpoint-1'}"
        in error
    )
    train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-1"))
    assert checkpoint_steps(out) == [1, 2, 3]
