"""Is a checkpoint directory whole? Find the missing or cut-off file without loading a tensor.

A megatron ``dist_checkpointing`` (torch_dist) directory holds ``metadata.json`` (backend and
version, written last: a save killed mid-way has none), ``.metadata`` (torch DCP's index of every
stored tensor and object: file, offset, length) and the ``__R_I.distcp`` files it points into.
``checkpoint_file_problems`` reads the two metadata files and compares each data file's size with
the extent ``.metadata`` expects, so a truncated copy or a partial rsync is reported, naming the
directory and the file, before any process group or model exists (``training.preflight``).

Loads are wrapped in ``reading_checkpoint``: a failure while reading becomes the same one-line
``CheckpointError`` (exit 2) instead of torch's ``EOFError: Ran out of input``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from megatron_finevit.config.errors import UserError

METADATA_JSON = "metadata.json"
DCP_INDEX = ".metadata"
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"  # deepspeed_checkpointing.MODEL_STATES


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or unreadable; each problem names directory and file."""

    kind = "checkpoint error"


def checkpoint_file_problems(path: str | Path) -> list[str]:
    """One line per missing, unreadable or cut-off file of the checkpoint directory ``path``
    (empty: every file the checkpoint's own index lists is there, at least as long as needed)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: no such checkpoint directory"]
    if (path / DEEPSPEED_MODEL_STATES).is_file():
        return []  # the DeepSpeed engine's format: DeepSpeed checks its own files
    problems = []
    config = path / METADATA_JSON
    if not config.is_file():
        problems.append(f"{config} is missing: {path} is not a complete megatron checkpoint "
                        "(a save that did not finish, or not a checkpoint directory)")
    else:
        try:
            json.loads(config.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{config} is not valid JSON ({exc}): the checkpoint is corrupt")
    index = path / DCP_INDEX
    if not index.is_file():
        return problems + [f"{index} is missing: the checkpoint's tensor index is gone"]
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as exc:  # torch reads it with pickle: EOFError, UnpicklingError, ...
        return problems + [f"{index} cannot be read ({type(exc).__name__}: {exc}): the "
                           "checkpoint is truncated or corrupt"]
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, extent in sorted(needed.items()):
        data = path / name
        if not data.is_file():
            problems.append(f"{data} is missing ({DCP_INDEX} lists it)")
        elif data.stat().st_size < extent:
            problems.append(f"{data} is cut off: {data.stat().st_size} bytes, {DCP_INDEX} "
                            f"expects at least {extent}")
    return problems


@contextmanager
def reading_checkpoint(path: str | Path):
    """Around a load from ``path``: a failure caused by a missing or cut-off file (or an I/O
    error) becomes a ``CheckpointError`` naming it; any other failure propagates unchanged."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException derives from BaseException
        problems = checkpoint_file_problems(path)
        if problems:
            raise CheckpointError(problems) from exc
        if isinstance(exc, (EOFError, OSError)):
            raise CheckpointError(f"{path}: reading failed ({type(exc).__name__}: {exc})") from exc
        raise
