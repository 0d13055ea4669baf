"""Stage III initialisation: FineViT from an earlier stage's run, Qwen3 from a converted HF model.

Both load through megatron's ``dist_checkpointing`` with the module's own ``sharded_state_dict``,
so they work at any TP / PP (each rank reads its slices). Before reading a tensor, every key the
module needs is looked up in the checkpoint's index and its global shape compared, so a wrong
directory or a different model size fails with one ``CheckpointError`` naming the piece, the
directory and the first differing tensors — not with a resharding traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_finevit.config.common import RECOMPUTE_FIELDS
from megatron_finevit.training.checkpoint_files import CheckpointError, reading_checkpoint

# Qwen3Config fields that choose the layer implementation or the recompute, not the weights
_IMPLEMENTATION_FIELDS = {"spec_backend", "fp8", "fp8_recipe", *RECOMPUTE_FIELDS}


def _check_and_load(module: torch.nn.Module, prefix: str, path: Path, what: str) -> None:
    """Load ``module``'s weights stored under ``prefix`` in the checkpoint ``path``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader

    template = module.sharded_state_dict(prefix=prefix)
    reader = MegatronCheckpointReader(str(path))
    stored = {key: reader.shape(key) for key in reader.keys()}
    missing, wrong = [], []
    for item in template.values():
        if not isinstance(item, ShardedTensor):
            continue
        if item.key not in stored:
            missing.append(item.key)
        elif tuple(stored[item.key]) != tuple(item.global_shape):
            wrong.append(f"{item.key} {list(stored[item.key])} (this model: "
                         f"{list(item.global_shape)})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors of the {what} are not in it "
                        f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the {what} have other shapes "
                        f"({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")
    if problems:
        raise CheckpointError(f"{path} does not hold this run's {what}: " + "; ".join(problems))
    with reading_checkpoint(path):
        loaded = dist_checkpointing.load(template, str(path))
    # the load also returns the checkpoint's common (non-sharded) state: keep the module's keys
    module.load_state_dict({key.removeprefix(prefix): loaded[key] for key in template})


def load_vit_weights(encoder: torch.nn.Module, run_dir: str) -> Path:
    """Initialise the FineViT ``encoder`` from the newest checkpoint of a Stage II (or Stage I)
    training run in ``run_dir`` (its ``encoder.*`` tensors; heads and text tower are not read).
    Returns the checkpoint read."""
    from megatron_finevit.training.checkpointing import latest_checkpoint

    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"stage_config.vit_init_dir={run_dir} holds no checkpoint "
                              "(no `latest` file)")
    _check_and_load(encoder, "encoder.", path, "FineViT encoder (stage_config.vit_init_dir)")
    return path


def load_llm_weights(llm: torch.nn.Module, config, ckpt_dir: str) -> None:
    """Initialise the Qwen3 ``llm`` (this pipeline stage's part) from a megatron checkpoint that
    ``tools/convert_checkpoint.py hf-to-mcore --model qwen3`` wrote; its ``model_config.json``
    must describe ``config`` (a ``Qwen3Config``) up to the layer implementation."""
    from megatron_finevit.convert.pipeline import MODEL_CONFIG_FILE

    path = Path(ckpt_dir)
    config_file = path / MODEL_CONFIG_FILE
    where = f"stage_config.llm_init_dir={ckpt_dir}"
    if not config_file.is_file():
        raise CheckpointError(f"{where} has no {MODEL_CONFIG_FILE}: convert the Hugging Face "
                              "Qwen3 directory first with `python tools/convert_checkpoint.py "
                              "hf-to-mcore --model qwen3 --hf-dir HF_DIR --mcore-dir OUT`")
    saved = json.loads(config_file.read_text())
    if saved.get("model") != "qwen3":
        raise CheckpointError(f"{where} holds a {saved.get('model')!r} model, not qwen3")
    ours = config.to_dict()
    differ = sorted(k for k in ours if k not in _IMPLEMENTATION_FIELDS
                    and saved["config"].get(k, ours[k]) != ours[k])
    if differ:
        raise CheckpointError(f"{where} holds another Qwen3 than stage_config.llm describes: "
                              + ", ".join(f"{k} {saved['config'][k]} (run: {ours[k]})"
                                          for k in differ))
    _check_and_load(llm, "", path, "Qwen3 language model (stage_config.llm_init_dir)")
