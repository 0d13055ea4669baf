"""The entry points as a user runs them: subprocesses with a clean launcher environment, and one
real checkpoint (a toy-LM run of the train CLI) shared by the checkpoint-error tests."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without torchrun's or Slurm's variables (a CI job may run inside an
    allocation), one BLAS thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``args`` run from the repository root (``-m module ...`` or a tool's path)."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A published checkpoint (``iter_0000001``) of a one-step toy-LM run, made by the train CLI
    in one process."""
    directory = tmp_path_factory.mktemp("toy_run") / "ckpt"
    proc = run_cli("-m", "megatron_finevit.train", "stage=toy_lm", "train_steps=1",
                   "global_batch_size=1", "precision=fp32", f"checkpoint.dir={directory}",
                   "eval.at_start=false", "eval.at_end=false", "logging.progress_bar=false",
                   env=clean_env(MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (directory / "latest").read_text().strip() == "iter_0000001"
    return directory / "iter_0000001"


@pytest.fixture
def damaged_checkpoint(toy_checkpoint, tmp_path):
    """``damage(how) -> Path``: a copy of the toy checkpoint (inside a run directory with a
    ``latest`` pointer) with one file cut short, removed or garbled."""

    def damage(how: str) -> Path:
        run = tmp_path / how
        copy = run / toy_checkpoint.name
        shutil.copytree(toy_checkpoint, copy)
        (run / "latest").write_text(toy_checkpoint.name)
        if how == "cut_index":
            (copy / ".metadata").write_bytes((copy / ".metadata").read_bytes()[:100])
        elif how == "cut_data":
            data = copy / "__0_0.distcp"
            data.write_bytes(data.read_bytes()[:1000])
        elif how == "no_metadata_json":
            (copy / "metadata.json").unlink()
        elif how == "bad_metadata_json":
            (copy / "metadata.json").write_text('{"sharded_back')
        elif how == "dangling_latest":
            (run / "latest").write_text("iter_0000009")
        else:
            raise ValueError(how)
        return copy

    return damage
