"""SigLIP2 text tower checks shared by the model and conversion tests: real captions tokenized by
an in-process SentencePiece model, a transformers ``Siglip2TextModel`` with every weight random
(biases and LayerNorm parameters included, so a mis-mapped one shows), and the world functions
(``testing/multirank.run_world``) that load our tower from a converted checkpoint at several
layouts.
"""

from __future__ import annotations

import io
import os

import torch

SEED = 1234

CAPTIONS = (
    "A red bicycle leaning against a brick wall on a quiet street.",
    "Two dogs playing with a ball in a green park under a blue sky.",
    "A bowl of ramen with a soft boiled egg, green onions and slices of pork.",
    "The old lighthouse stands on the rocks while waves crash below.",
    "A child in a yellow raincoat jumps into a puddle.",
    "Close-up of a street sign reading 'Main St' next to a traffic light.",
    "An aerial view of a city at night with glowing roads and tall buildings.",
    "A woman reading a book by the window of a small wooden cabin.",
    "Three sailboats on a calm lake at sunset, mountains in the background.",
    "A cat sleeping on a laptop keyboard beside a cup of coffee.",
    "A cat.",
    "Two dogs on a beach.",
)


def sentencepiece_proto(vocab_size: int = 120) -> bytes:
    """A unigram SentencePiece model trained on ``CAPTIONS`` (Gemma's special ids: pad 0, eos 1,
    bos 2, unk 3)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 4), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    return model.getvalue()


def caption_ids(context_length: int, proto: bytes | None = None) -> torch.Tensor:
    """``[len(CAPTIONS), context_length]`` int64 rows as the data pipeline makes them
    (lowercased, EOS, padded; long captions truncated)."""
    from megatron_finevit.data.tokenizers import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(model_proto=proto or sentencepiece_proto(), lowercase=True)
    ids, _ = tokenizer.encode(list(CAPTIONS), context_length)
    return ids


def random_hf_text_model(text_config, seed: int = SEED):
    """transformers ``Siglip2TextModel`` for our ``SigLIP2TextConfig``, every parameter drawn
    at random (LayerNorm weights around 1)."""
    from transformers import Siglip2TextConfig, Siglip2TextModel

    from megatron_finevit.convert.siglip2_text import CONVERTER

    hf_config = CONVERTER.hf_config(text_config, torch.float32)
    hf_config = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    model = Siglip2TextModel(Siglip2TextConfig(**hf_config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_weight = "layer_norm" in name and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.05 * noise)
    return model


@torch.no_grad()
def hf_outputs(model, ids: torch.Tensor) -> dict:
    out = model(input_ids=ids)
    return {"pooled": out.pooler_output, "hidden": out.last_hidden_state}


# --- world functions ---------------------------------------------------------------------------


def setup_layout(text_config, tp: int, sp: bool) -> None:
    from megatron_finevit.platform import ParallelConfig, init_parallel, set_seed

    init_parallel(ParallelConfig(tensor_parallel=tp, sequence_parallel=sp),
                  num_attention_heads=text_config.num_attention_heads,
                  num_layers=text_config.num_layers)
    set_seed(SEED)


def load_tower(text_config, ckpt_dir: str, tp: int = 1, sp: bool = False):
    """Our tower at TP ``tp`` (+SP), weights from a megatron checkpoint (megatron reshards)."""
    from megatron.core import dist_checkpointing

    from megatron_finevit.models.text_tower import build_text_tower

    setup_layout(text_config, tp, sp)
    tc = text_config.to_transformer_config(tp, sp, perform_initialization=False)
    tower = build_text_tower(text_config, tc).eval()
    tower.load_state_dict(dist_checkpointing.load(tower.sharded_state_dict(), ckpt_dir))
    return tower


@torch.no_grad()
def tower_outputs(tower, ids: torch.Tensor) -> dict:
    return {"pooled": tower(ids), "hidden": tower.encode(ids)}


def layouts_world(rank: int, world_size: int, text_config, ckpt_dir: str, ids: torch.Tensor,
                  layouts: list[tuple[int, bool]], extended_dir: str, long_ids: torch.Tensor,
                  keep: int) -> dict:
    """Outputs of the tower loaded from ``ckpt_dir`` at each (tp, sp) layout, plus each rank's
    TP shard check against the registry's split rules. The last layout's tower is then
    stretched to ``long_ids.shape[1]`` positions and saved to ``extended_dir`` as a trainer
    would (``report["extended"]``: its outputs on ``long_ids``)."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader, checkpoint_tensors
    from megatron_finevit.convert.siglip2_text import CONVERTER

    mappings = {m.megatron_key(): m for m in CONVERTER.mappings(text_config)}
    reader = MegatronCheckpointReader(ckpt_dir)
    report = {}
    for tp, sp in layouts:
        tower = load_tower(text_config, ckpt_dir, tp, sp)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        worst, count = 0.0, 0
        for (key, layer), local in checkpoint_tensors(tower).items():
            (full,) = reader.load([(key, layer)]).values()
            worst = max(worst, (local - mappings[key].shard(full, tp, tp_rank)).abs().max().item())
            count += 1
        report[f"tp{tp}" + ("_sp" if sp else "")] = {**tower_outputs(tower, ids),
                                                     "shard_max_abs": worst, "tensors": count}
    tower.extend_context(long_ids.shape[1], keep=keep)
    os.makedirs(extended_dir, exist_ok=True)
    dist_checkpointing.save(tower.sharded_state_dict(), extended_dir)
    report["extended"] = tower_outputs(tower, long_ids)
    return report


def extension_world(rank: int, world_size: int, text_config, ckpt_dir: str, new_len: int,
                    keep: int, ids: torch.Tensor) -> dict:
    """The converted tower stretched to ``new_len`` positions: its table before and after, and
    its outputs on ``new_len``-token rows."""
    tower = load_tower(text_config, ckpt_dir)
    before = tower.embedding.position_embeddings.weight.detach().clone()
    tower.extend_context(new_len, keep=keep)
    return {"before": before, "after": tower.embedding.position_embeddings.weight.detach().clone(),
            "context_length": tower.context_length,
            "config_context": tower.text.max_position_embeddings,
            "tagged": all(getattr(p, "is_text_tower", False) for p in tower.parameters()),
            **tower_outputs(tower, ids)}


def freeze_world(rank: int, world_size: int, text_config, ids: torch.Tensor) -> dict:
    """Freeze / unfreeze seen by a torch AdamW and by megatron's DDP grad buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.optimizer_config import ParamKey

    from megatron_finevit.models.text_tower import TEXT_TOWER_PARAM_ATTR, build_text_tower

    setup_layout(text_config, 1, False)
    tower = build_text_tower(text_config, text_config.to_transformer_config())
    rest = torch.nn.Parameter(torch.tensor(2.0))  # stands for the rest of the model (the ViT)
    optimizer = torch.optim.AdamW([*tower.parameters(), rest], lr=1e-2, weight_decay=0.1)
    key = ParamKey(attr=TEXT_TOWER_PARAM_ATTR)
    report = {"param_key_selects_tower": all(key.matches(p, n) for n, p in tower.named_parameters())
              and not key.matches(rest, "rest")}

    def step() -> tuple[bool, bool]:
        """One optimiser step; (did any tower weight move, did ``rest`` move)."""
        before = [p.detach().clone() for p in tower.parameters()]
        rest_before = rest.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        (tower(ids).square().mean() * rest).backward()
        optimizer.step()
        moved = any(not torch.equal(b, p) for b, p in zip(before, tower.parameters()))
        return moved, not torch.equal(rest_before, rest)

    tower.set_trainable(False)
    report["frozen_requires_grad"] = [p.requires_grad for p in tower.parameters()]
    report["frozen_step"] = step()
    tower.set_trainable(True)
    report["unfrozen_requires_grad"] = [p.requires_grad for p in tower.parameters()]
    report["unfrozen_step"] = step()

    # megatron DDP: wrapped while trainable (buffers are fixed at wrap time), frozen afterwards.
    ddp = DistributedDataParallel(tower.config, DistributedDataParallelConfig(), tower)

    def main_grad_norms() -> list[float]:
        ddp.zero_grad_buffer()
        (ddp(ids).square().mean() * rest).backward()
        ddp.finish_grad_sync()
        return [p.main_grad.norm().item() for p in tower.parameters()]

    tower.set_trainable(False)
    report["ddp_frozen_grad_norms"] = main_grad_norms()
    tower.set_trainable(True)
    report["ddp_unfrozen_grad_norms"] = main_grad_norms()
    return report


def tower_world(rank: int, world_size: int, text_config, ckpt_dir: str, new_len: int, keep: int,
                long_ids: torch.Tensor, ids: torch.Tensor) -> dict:
    """``extension_world`` and ``freeze_world`` in one spawned process."""
    return {"extension": extension_world(rank, world_size, text_config, ckpt_dir, new_len, keep,
                                         long_ids),
            "freeze": freeze_world(rank, world_size, text_config, ids)}
