"""Qwen3 checks shared by the model and conversion tests: real-tokenizer text packed into THD
sequences, a forward pass at any TP / SP / PP / CP through megatron's schedules, and the world
functions that run them (see ``testing/multirank.run_world``).

Every logits tensor returned here is the full ``[T, vocab_size]`` pack in global token order
(TP and CP gathered, padded vocabulary rows dropped), so any two layouts — and transformers'
``Qwen3ForCausalLM`` — compare row for row.
"""

from __future__ import annotations

import torch

from megatron_finevit.testing.gpt_parity import load_checkpoint, save_checkpoint
from megatron_finevit.testing.multirank import Layout

SEED = 4321

# Real text, tokenized with the real Qwen tokenizer (special tokens included).
TEXTS = (
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.",
    "<|im_start|>user\nDescribe the image: a red bicycle leaning on a wall.<|im_end|>",
    "FineViT encodes images at native resolution; 2×2 patches merge into one token.",
)


def text_segments(multiple: int = 4) -> list[torch.Tensor]:
    """Token ids of ``TEXTS`` (int64 ``[n_i]``), each cut to a multiple of ``multiple`` tokens
    (context parallelism needs segments divisible by 2·cp)."""
    from megatron_finevit.data.tokenizers import QwenTokenizer

    tokenizer = QwenTokenizer.from_tiktoken()
    segments = []
    for text in TEXTS:
        ids = tokenizer.encode(text, allow_special=True)
        segments.append(torch.tensor(ids[: len(ids) // multiple * multiple], dtype=torch.long))
    return segments


def setup_layout(config, layout: Layout) -> None:
    from megatron_finevit.platform import init_parallel, set_seed

    init_parallel(layout.parallel_config(), num_attention_heads=config.num_attention_heads,
                  num_query_groups=config.num_query_groups, num_layers=config.num_layers)
    set_seed(SEED)


def build_model(config, layout: Layout, perform_initialization: bool = True):
    from megatron_finevit.models.llm import build_qwen3

    tc = config.to_transformer_config(layout.tp, layout.pp, layout.cp, layout.sp,
                                      perform_initialization=perform_initialization)
    return build_qwen3(config, tc)


@torch.no_grad()
def forward_only(model, run, seq_length: int) -> torch.Tensor | None:
    """``run(model)`` as one micro-batch of megatron's forward-only schedule (1F1B p2p of
    ``[seq_length (/ TP under SP), 1, hidden]`` activations when PP > 1): the last stage's output,
    detached, or None on other stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected = []

    def forward_step(data_iterator, step_model):
        next(data_iterator)

        def collect(output_tensor):
            collected.append(output_tensor.detach().clone())
            return output_tensor.sum() * 0.0, {}

        return run(step_model), collect

    model.eval()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]),
                                model=[model], num_microbatches=1, seq_length=seq_length,
                                micro_batch_size=1, forward_only=True)
    return collected[0] if collected else None


@torch.no_grad()
def packed_logits(model, config, segments: list[torch.Tensor]) -> torch.Tensor | None:
    """Logits ``[T, vocab_size]`` of the segments packed as one THD sequence (each segment
    attends causally to itself, RoPE positions restart per segment); None on ranks that are not
    the last pipeline stage. Runs megatron's forward-only schedule (1F1B p2p when PP > 1)."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_finevit.models.attention import gather_from_cp, partition_for_cp

    lengths = torch.tensor([len(s) for s in segments])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    cp, cp_rank = (parallel_state.get_context_parallel_world_size(),
                   parallel_state.get_context_parallel_rank())
    tokens = partition_for_cp(torch.cat(segments), cu, cp, cp_rank)[None]  # [1, T / cp]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
    output = forward_only(model, lambda m: m(tokens, None, None, packed_seq_params=params),
                          seq_length=tokens.shape[1])
    if output is None:
        return None
    logits = gather_from_tensor_model_parallel_region(output)[0]  # [T / cp, V_pad]
    if cp > 1:
        logits = gather_from_cp(logits, cu, parallel_state.get_context_parallel_group())
    return logits[:, : config.vocab_size]


@torch.no_grad()
def sequence_logits(model, config, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, vocab_size]`` of one unpacked sequence (SBHD, causal), TP = PP = CP = 1."""
    model.eval()
    logits = model(ids[None], torch.arange(len(ids))[None], None)
    return logits[0, :, : config.vocab_size]


def shard_errors(model, ckpt_dir: str, config) -> dict:
    """Max |model tensor − the mapping's TP shard of the checkpoint tensor| over all tensors
    this rank holds: megatron's load-time resharding against our registry's TP split rules."""
    from megatron.core import parallel_state

    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader, checkpoint_tensors
    from megatron_finevit.convert.qwen3 import CONVERTER

    mappings = {m.megatron_key(): m for m in CONVERTER.mappings(config)}
    reader = MegatronCheckpointReader(ckpt_dir)
    tp, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_tensor_model_parallel_rank())
    worst, count = 0.0, 0
    for (key, layer), local in checkpoint_tensors(model).items():
        (full,) = reader.load([(key, layer)]).values()
        expected = mappings[key].shard(full, tp, tp_rank)
        worst = max(worst, (local.detach() - expected).abs().max().item())
        count += 1
    return {"max_abs": worst, "tensors": count}


# --- world functions ---------------------------------------------------------------------------


def oracle_world(rank: int, world_size: int, config, ckpt_dir: str) -> dict:
    """Single rank: a randomly initialised Qwen3 saved to ``ckpt_dir``; its packed logits and
    each segment's unpacked logits."""
    layout = Layout()
    setup_layout(config, layout)
    model = build_model(config, layout)
    save_checkpoint(model, ckpt_dir)
    segments = text_segments()
    return {"packed": packed_logits(model, config, segments),
            "per_sequence": [sequence_logits(model, config, s) for s in segments]}


def layouts_world(rank: int, world_size: int, config, ckpt_dir: str, layouts: list[Layout]) -> dict:
    """Each layout loads ``ckpt_dir`` (megatron reshards) and returns its packed logits (last
    pipeline stage only) and the shard check."""
    report = {}
    segments = text_segments()
    for layout in layouts:
        setup_layout(config, layout)
        model = build_model(config, layout, perform_initialization=False)
        load_checkpoint(model, ckpt_dir)
        report[layout.label] = {"logits": packed_logits(model, config, segments),
                                "shards": shard_errors(model, ckpt_dir, config)}
    return report


def export_world(rank: int, world_size: int, configs: dict, layouts: dict, out_dirs: dict) -> dict:
    """For each name: a randomly initialised Qwen3 (``configs[name]``) at ``layouts[name]``,
    saved with dist_checkpointing to ``out_dirs[name]`` as a trainer would; returns its packed
    logits (last stage) for comparison with the exported HF model."""
    report = {}
    segments = text_segments()
    for name, layout in layouts.items():
        setup_layout(configs[name], layout)
        model = build_model(configs[name], layout)
        save_checkpoint(model, out_dirs[name])
        report[name] = packed_logits(model, configs[name], segments)
    return report


def hf_packed_logits(hf_model, segments: list[torch.Tensor]) -> torch.Tensor:
    """transformers' logits for each segment run on its own, concatenated: ``[T, vocab]``."""
    with torch.no_grad():
        return torch.cat([hf_model(s[None]).logits[0] for s in segments])


def convert_world(rank: int, world_size: int, jobs: list[dict]) -> dict:
    """Single rank: ``hf_to_megatron`` for each job (hf_dir, mcore_dir, tp, pp), then the packed
    logits of the converted checkpoint loaded at TP = 1."""
    from megatron_finevit.convert.pipeline import hf_to_megatron, load_model_config

    report = {}
    for job in jobs:
        summary = hf_to_megatron("qwen3", job["hf_dir"], job["mcore_dir"], job["tp"], job["pp"],
                                 progress=False)
        config = load_model_config("qwen3", job["mcore_dir"])
        setup_layout(config, Layout())
        model = build_model(config, Layout(), perform_initialization=False)
        load_checkpoint(model, job["mcore_dir"])
        report[job["mcore_dir"]] = {"summary": summary,
                                    "logits": packed_logits(model, config, text_segments())}
    return report


def load_and_export_world(rank: int, world_size: int, config, ckpt_dir: str, layouts: list[Layout],
                          export_configs: dict, export_layouts: dict, export_dirs: dict) -> dict:
    """Two checks in one world: ``layouts_world`` on a converted checkpoint, and
    ``export_world`` for checkpoints to be exported to HF."""
    return {"loaded": layouts_world(rank, world_size, config, ckpt_dir, layouts),
            "exported": export_world(rank, world_size, export_configs, export_layouts, export_dirs)}
