"""FineViT-VL Stage III step, ours (packed THD) against transformers (padded batches), on CPU;
and how evenly packing spreads ViT + LLM work over data-parallel ranks.

    python tools/bench_vlm.py                  # ~5 minutes on 2 busy cores
    python tools/bench_vlm.py --steps 1 --warmup 0 --dp-steps 5 --width 64 --llm-width 64

Every result is one ``name=value`` line on stdout; the settings line and progress go to stderr.

Throughput. One random megatron ``FineViTVLModel`` (fp32; ViT ``--vit-layers`` x ``--width``,
Qwen3 LLM ``--llm-layers`` x ``--llm-width``: the defaults give the LLM about the share of the
FLOPs it has in FineViT-VL-8B, see ``llm_flops_share_*``) is exported through
``megatron_finevit.convert`` to the transformers ``FineViTVLForConditionalGeneration``, so both
run the same weights. Samples: image sizes of the synthetic data (``data.synthetic``: short side
200-600 px, long side <= 900 px) through ``smart_resize`` (<= ``--max-pixels``, Stage III's 1000²
by default), random pixels; a conversation of 1-8 turns of 24-64 tokens (question, then the
supervised answer), the image's placeholders in the first. Stage III's ``PackedBatchSampler``
packs them into Stage III's budgets (``RegionQAConfig``: 4096 LLM / 16384 ViT tokens):

* ours: each pack -> ``pack_multimodal`` -> one ``[1, T]`` THD micro-batch (a segment per
  sample, the padding tails their own, cut to a multiple of 64 rows as the align stage does
  without pipeline parallelism: ``MultimodalBatch.trimmed``), forward + backward as
  ``training/stages/align.py`` runs it: the output layer and the loss only on the rows with a label (``output_mask``,
  ``models/llm/masked_output``). How much that saves depends on the output layer's share of the
  LLM's FLOPs, printed as ``output_layer_share_*``: with the defaults (``--vocab`` 8,192, width
  512) it is about 25%, above Qwen3-1.7B's 18% and Qwen3-8B's 8% (151,669 rows), so the bench
  does not understate what transformers pays for it;
* transformers: the same samples in data order (the sampler's shard order), cut into batches of
  the packs' mean sample count — the usual fixed-count batches: every text padded to the batch's
  longest (right padding, ``attention_mask``, labels -100 on padding and unsupervised tokens),
  the images laid out as its processor does (``pixel_values`` of all images, ``image_grid_thw``),
  forward + backward. (Not the packs' own grouping: first-fit-decreasing puts samples of similar
  length together, which would spare transformers most of its padding.)

Before timing, one pack runs on both sides grouped alike and their losses are compared
(``vlm_loss_abs_diff``: same weights, samples and supervised tokens). Then ``--warmup`` packs
(and their samples' batches), then ``--steps`` timed packs, the two sides alternating step by
step (which goes first alternates too). Tokens/s count real LLM tokens (image placeholders and
text, no padding) over the summed wall-clock seconds; ``vlm_ratio_vs_hf`` is ours over theirs,
``vlm_cpu_time_ratio_vs_hf`` the same from process CPU seconds (steadier on a shared machine).
To tell where a difference comes from: ``vlm_flops_computed_over_real_*``, the FLOPs each side
computes (``planning.flops``, padding included: our packs' LLM padding tail is a segment, the
ViT side is not padded, transformers' rows run to the batch's longest; our output layer on
labelled rows only) over the real work (which counts the output layer on every real token, so
ours can be below 1), and
``vlm_gflops_per_s_*``, each side's rate on what it computes.

DP imbalance. ``--dp-samples-per-rank`` x ``--dp-size`` sample sizes are drawn the same way at
Stage III's settings (``RegionQAConfig``: images within 1000x1000, 4096 LLM / 16384 ViT tokens
per pack, buffer 512, min fill 0.9): per sample (ViT patches, LLM tokens = placeholders + 2
vision markers + text). Every DP rank runs its own ``PackedBatchSampler`` (rank r of
``--dp-size``, as ``RegionQALoader`` builds it) and takes ``--dp-microbatches`` packs per step.
A rank's work in a step is ``planning.flops.vlm_flops`` of ``--dp-preset`` over its samples (real
tokens, all towers trained). Per step the imbalance is max / mean over the ranks (the slowest
rank sets the step time; 1.0 is perfect); ``dp_imbalance`` is its mean over ``--dp-steps``
steps. ``dp_imbalance_naive``: the same rank shards in the same order, each rank taking a fixed
number of samples per step (the packed run's mean per rank and step) — fixed-count batching;
only real work is compared (its padding is not charged).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_finevit.logs import quiet_third_party_logs

IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID, PAD_ID = 5, 6, 7, 0
FIRST_TEXT_ID = 16
TURNS = (1, 8)          # QA turns per image (RegionQAConfig.max_turns = 8)
TURN_TOKENS = (24, 64)  # one turn: chat markers, a question with a box, the answer
VISION_MARKERS = 2      # <|vision_start|>, <|vision_end|>
KINDS = ("qa",)


# --- samples --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SampleSizes:
    """Per sample ``[n]``: resized image ``heights`` / ``widths`` (pixels), ``patches`` (ViT
    tokens), ``turns`` (token count of each QA turn) and ``llm_tokens`` (placeholders + vision
    markers + text)."""

    heights: np.ndarray
    widths: np.ndarray
    patches: np.ndarray
    turns: list[list[int]]
    llm_tokens: np.ndarray


def draw_sizes(num: int, max_pixels: int, seed: int) -> SampleSizes:
    """``num`` samples as described in the module docstring (images the policy rejects for their
    aspect ratio are redrawn)."""
    from megatron_finevit.data.bad_samples import BadSampleError
    from megatron_finevit.data.resize import ResizePolicy
    # the synthetic data's own size draw (FineCap-mini's default scene), not a copy of its rule
    from megatron_finevit.data.synthetic import SceneSpec, _image_size

    scene = SceneSpec()
    policy = ResizePolicy(max_pixels=max_pixels)
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < num:
        try:
            sizes.append(policy.target_size(*_image_size(rng, scene)))
        except BadSampleError:
            continue
    heights, widths = (np.array(side, dtype=np.int64) for side in zip(*sizes))
    patches = (heights // 14) * (widths // 14)
    turns = [rng.integers(TURN_TOKENS[0], TURN_TOKENS[1] + 1, rng.integers(TURNS[0], TURNS[1] + 1))
             .tolist() for _ in range(num)]
    text = np.array([sum(t) for t in turns], dtype=np.int64)
    return SampleSizes(heights, widths, patches, turns, patches // 4 + VISION_MARKERS + text)


def stage_sampler(sizes: SampleSizes, llm_tokens: int, vit_tokens: int, seed: int,
                  dp_rank: int = 0, dp_size: int = 1, buffer_size: int = 512,
                  min_fill: float = 0.9):
    """Stage III's packing sampler over ``sizes`` for one DP rank (as ``RegionQALoader``)."""
    from megatron_finevit.data.packing import PackedBatchSampler

    return PackedBatchSampler(np.stack([sizes.patches, sizes.llm_tokens], axis=1),
                              [vit_tokens, llm_tokens], buffer_size=buffer_size, seed=seed,
                              dp_rank=dp_rank, dp_size=dp_size, min_fill=min_fill)


def endless(sampler):
    """The sampler's packs (lists of sample indices), epoch after epoch."""
    while True:
        yield from sampler


def make_sample(sizes: SampleSizes, index: int, vocab: int, generator: torch.Generator):
    """Sample ``index`` as a ``MultimodalSample``: random pixels, then a conversation with the
    image's placeholders in the first turn; each turn's question half unsupervised, its answer
    half supervised."""
    from megatron_finevit.data.tasks.chat import EncodedConversation, Turn
    from megatron_finevit.data.tasks.multimodal import MultimodalSample

    height, width = int(sizes.heights[index]), int(sizes.widths[index])
    windows = int(sizes.patches[index]) // 4
    ids, supervised, answer_turn = [], [], []
    for turn, tokens in enumerate(sizes.turns[index]):
        question = tokens // 2
        if turn == 0:
            ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * windows + [VISION_END_ID]
            supervised += [False] * (windows + VISION_MARKERS)
            answer_turn += [-1] * (windows + VISION_MARKERS)
        ids += torch.randint(FIRST_TEXT_ID, vocab, (tokens,), generator=generator).tolist()
        supervised += [False] * question + [True] * (tokens - question)
        answer_turn += [-1] * question + [turn] * (tokens - question)
    conversation = EncodedConversation(
        ids=torch.tensor(ids), supervised=torch.tensor(supervised),
        answer_turn=torch.tensor(answer_turn),
        turns=[Turn("", "", KINDS[0]) for _ in sizes.turns[index]], num_image_tokens=windows)
    image = torch.randn(3, height, width, generator=generator)
    return MultimodalSample(str(index), [image], conversation)


# --- the two steps ----------------------------------------------------------------------------


def ours_step(model, batch):
    """Forward + backward of one packed micro-batch, as ``AlignStage.forward_step`` runs it."""
    from megatron_finevit.data.tasks.chat import IGNORE_INDEX
    from megatron_finevit.models.llm.packing import thd_packed_seq_params

    labels = batch.labels.masked_fill(batch.labels == IGNORE_INDEX, 0)
    params = thd_packed_seq_params(batch.cu_seqlens)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        token_loss = model(batch.images, batch.input_ids[None], batch.position_ids[None],
                           labels=labels[None], packed_seq_params=params,
                           output_mask=batch.loss_mask[None]).reshape(-1)
        loss = (token_loss * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1.0)
        loss.backward()
        return loss.item()

    return step


def hf_inputs(samples) -> dict:
    """The samples as transformers' padded batch: right-padded ``input_ids`` / ``attention_mask``
    / ``labels`` ``[B, S]`` (HF shifts labels itself) and the processor's image layout."""
    from megatron_finevit.data.tasks.chat import IGNORE_INDEX
    from megatron_finevit.models.vit import pack_images

    longest = max(len(s.conversation) for s in samples)
    input_ids = torch.full((len(samples), longest), PAD_ID)
    labels = torch.full((len(samples), longest), IGNORE_INDEX)
    attention_mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, sample in enumerate(samples):
        c = sample.conversation
        input_ids[row, :len(c)] = c.ids
        labels[row, :len(c)] = torch.where(c.supervised, c.ids, IGNORE_INDEX)
        attention_mask[row, :len(c)] = 1
    images = pack_images([image for s in samples for image in s.images])
    grid_thw = torch.cat([torch.ones(len(images.grids), 1, dtype=torch.long), images.grids], 1)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=images.patches, image_grid_thw=grid_thw)


def hf_step(model, inputs: dict):
    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.item()

    return step


def timed(step) -> tuple[float, float, float]:
    """(wall-clock seconds, process CPU seconds, loss) of one call: on a shared machine the CPU
    time shows what the wall clock loses to other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step()
    return time.perf_counter() - wall, time.process_time() - cpu, loss


# --- models -----------------------------------------------------------------------------------


def bench_config(args):
    from megatron_finevit.config.llm import Qwen3Config
    from megatron_finevit.config.vit import FineViTConfig
    from megatron_finevit.config.vlm import FineViTVLConfig

    vit = FineViTConfig(num_layers=args.vit_layers, hidden_size=args.width,
                        ffn_hidden_size=3 * args.width,
                        num_attention_heads=max(1, args.width // 64))
    heads = max(2, args.llm_width // 64)
    llm = Qwen3Config(num_layers=args.llm_layers, hidden_size=args.llm_width,
                      ffn_hidden_size=3 * args.llm_width, num_attention_heads=heads,
                      num_query_groups=heads // 2, head_dim=args.llm_width // heads,
                      vocab_size=args.vocab, tie_embeddings=False,
                      max_position_embeddings=2 * args.llm_tokens, bos_token_id=None,
                      eos_token_id=None)
    return FineViTVLConfig(vit=vit, llm=llm, image_token_id=IMAGE_TOKEN_ID)


def build_models(config, workdir: Path):
    """Our megatron model (random, seeded) and transformers' model with its weights, exported
    through the checkpoint converter. Needs megatron's (single-rank) groups."""
    from megatron_finevit.convert.mcore_io import save_model_checkpoint
    from megatron_finevit.convert.pipeline import megatron_to_hf
    from megatron_finevit.hf.modeling_finevit_vl import FineViTVLForConditionalGeneration
    from megatron_finevit.models.vlm import FineViTVLModel
    from megatron_finevit.platform import set_seed

    set_seed(0)
    ours = FineViTVLModel(config, *config.to_transformer_configs())
    (workdir / "mcore").mkdir()
    save_model_checkpoint(ours, workdir / "mcore")
    megatron_to_hf("finevit-vl", str(workdir / "mcore"), str(workdir / "hf"), config=config,
                   progress=False)
    theirs = FineViTVLForConditionalGeneration.from_pretrained(workdir / "hf",
                                                               dtype=torch.float32)
    return ours.train(), theirs.train()


# --- the two measurements -----------------------------------------------------------------


def throughput(args, out) -> None:
    from megatron_finevit.config.vlm import finevit_vl_1p7b, finevit_vl_8b
    from megatron_finevit.convert.mcore_io import single_rank_world
    from megatron_finevit.data.tasks.multimodal import LLM_TRIM_MULTIPLE, pack_multimodal
    from megatron_finevit.planning.flops import linear_flops, llm_tower_flops, vlm_flops

    config = bench_config(args)
    # enough samples that the packs come from full sampler rounds, not an epoch's ragged end
    sizes = draw_sizes(4 * 512 + 32 * (args.warmup + args.steps), args.max_pixels, args.seed)
    sampler = stage_sampler(sizes, args.llm_tokens, args.vit_tokens, args.seed)
    position = {int(s): k for k, s in enumerate(sampler.shard(0))}  # data order
    stream = endless(sampler)
    phases = {"warm-up": [next(stream) for _ in range(args.warmup)],
              "timed": [next(stream) for _ in range(args.steps)]}
    timed_samples = [i for pack in phases["timed"] for i in pack]
    batch_size = max(1, round(len(timed_samples) / args.steps))

    def in_batches(packs: list[list[int]]) -> list[list[int]]:
        """The packs' samples in data order, ``batch_size`` at a time (transformers' batches)."""
        ordered = sorted((i for pack in packs for i in pack), key=position.__getitem__)
        return [ordered[k:k + batch_size] for k in range(0, len(ordered), batch_size)]

    generator = torch.Generator().manual_seed(args.seed)
    samples = {i: make_sample(sizes, i, config.llm.vocab_size, generator)
               for packs in phases.values() for pack in packs for i in pack}

    ours_batches: dict[tuple[int, ...], object] = {}

    def ours_batch(pack):
        """The pack's micro-batch, built once (the step and the FLOP count both read it)."""
        key = tuple(pack)
        if key not in ours_batches:
            ours_batches[key] = pack_multimodal([samples[i] for i in pack], args.llm_tokens,
                                                args.vit_tokens, PAD_ID, KINDS
                                                ).trimmed(LLM_TRIM_MULTIPLE)
        return ours_batches[key]

    def hf_batch(group):
        return hf_inputs([samples[i] for i in group])

    def llm_share(vl) -> float:
        patches = sizes.patches[timed_samples].tolist()
        lengths = sizes.llm_tokens[timed_samples].tolist()
        return 3 * llm_tower_flops(vl.llm, lengths).forward / vlm_flops(vl, patches, lengths)

    def output_layer_share(vl) -> float:
        """The output layer's share of the LLM's matmul FLOPs (on every token)."""
        lengths = sizes.llm_tokens[timed_samples].tolist()
        output = linear_flops(sum(lengths), vl.llm.hidden_size, vl.llm.padded_vocab_size)
        return output / llm_tower_flops(vl.llm, lengths).forward

    print(f"bench_vlm: ViT {config.vit.num_layers}x{config.vit.hidden_size}, LLM "
          f"{config.llm.num_layers}x{config.llm.hidden_size} (GQA {config.llm.num_attention_heads}"
          f"/{config.llm.num_query_groups}, vocab {config.llm.vocab_size}); ours: packs of "
          f"{args.llm_tokens} LLM / {args.vit_tokens} ViT tokens, "
          f"{len(timed_samples) / args.steps:.1f} samples each; transformers: the same samples "
          f"in data order, batches of {batch_size}; fwd+bwd fp32 on CPU, "
          f"{torch.get_num_threads()} threads; tokens are real LLM tokens (image placeholders "
          "and text, no padding)", file=sys.stderr, flush=True)
    first = (phases["warm-up"] + phases["timed"])[0]
    seconds = {"ours": 0.0, "hf": 0.0}
    cpu_seconds = dict(seconds)
    with single_rank_world(), tempfile.TemporaryDirectory() as workdir:
        ours, theirs = build_models(config, Path(workdir))
        # the same model on the same samples: one pack grouped alike on both sides, untimed
        loss_diff = abs(ours_step(ours, ours_batch(first))()
                        - hf_step(theirs, hf_batch(first))())
        for phase, packs in phases.items():
            sides = {"ours": [ours_step(ours, ours_batch(p)) for p in packs],
                     "hf": [hf_step(theirs, hf_batch(g)) for g in in_batches(packs)]}
            for index in tqdm(range(max(map(len, sides.values()))), unit="step", file=sys.stderr,
                              desc=f"{phase} steps, ours and hf alternating"):
                for name in (("ours", "hf") if index % 2 == 0 else ("hf", "ours")):
                    if index < len(sides[name]):
                        wall, cpu, _ = timed(sides[name][index])
                        if phase == "timed":
                            seconds[name] += wall
                            cpu_seconds[name] += cpu
    tokens = int(sizes.llm_tokens[timed_samples].sum())
    padded = sum(len(group) * int(sizes.llm_tokens[group].max())
                 for group in in_batches(phases["timed"]))
    rates = {name: tokens / max(s, 1e-9) for name, s in seconds.items()}

    def pack_flops(pack: list[int], computed: bool) -> float:
        """FLOPs of a pack; ``computed``: what our step computes — the LLM's padding tail too (a
        segment, as ``pack_multimodal`` lays it out, trimmed as the align stage trims it; the
        ViT side is not padded) and the output layer on the labelled rows only, as
        ``models/llm/masked_output`` runs it (else on every real token)."""
        patches, lengths = sizes.patches[pack].tolist(), sizes.llm_tokens[pack].tolist()
        if not computed:
            return vlm_flops(config, patches, lengths)
        batch = ours_batch(pack)
        padded = len(batch.input_ids)
        lengths += [padded - sum(lengths)] if padded > sum(lengths) else []
        return vlm_flops(config, patches, lengths, output_rows=int(batch.loss_mask.sum()))

    real_flops = sum(pack_flops(pack, computed=False) for pack in phases["timed"])
    computed = {"ours": sum(pack_flops(pack, computed=True) for pack in phases["timed"]),
                "hf": sum(vlm_flops(config, sizes.patches[group].tolist(),
                                    [int(sizes.llm_tokens[group].max())] * len(group))
                          for group in in_batches(phases["timed"]))}
    out("vlm_samples_per_pack", len(timed_samples) / args.steps)
    out("vlm_pack_fill", tokens / (args.llm_tokens * args.steps))
    out("vlm_hf_padding_efficiency", tokens / padded)
    for name in computed:  # the work each side does on padding, and its FLOP rate with it
        out(f"vlm_flops_computed_over_real_{name}", computed[name] / real_flops)
        out(f"vlm_gflops_per_s_{name}", computed[name] / max(seconds[name], 1e-9) / 1e9)
    out("llm_flops_share_bench", llm_share(config))
    out("llm_flops_share_finevit_vl_1p7b", llm_share(finevit_vl_1p7b()))
    out("llm_flops_share_finevit_vl_8b", llm_share(finevit_vl_8b()))
    for name, vl in (("bench", config), ("finevit_vl_1p7b", finevit_vl_1p7b()),
                     ("finevit_vl_8b", finevit_vl_8b())):
        out(f"output_layer_share_{name}", output_layer_share(vl))
    out("vlm_loss_abs_diff", loss_diff)
    out("vlm_tokens_per_s_ours", rates["ours"])
    out("vlm_tokens_per_s_hf", rates["hf"])
    out("vlm_cpu_time_ratio_vs_hf", cpu_seconds["hf"] / max(cpu_seconds["ours"], 1e-9))
    out("vlm_ratio_vs_hf", rates["ours"] / rates["hf"])


def dp_imbalance(args, out) -> None:
    from megatron_finevit.config.vlm import vl_preset
    from megatron_finevit.data.tasks.region_qa_loader import RegionQAConfig
    from megatron_finevit.planning.flops import vlm_flops

    stage = RegionQAConfig()
    config = vl_preset(args.dp_preset)
    sizes = draw_sizes(args.dp_samples_per_rank * args.dp_size, stage.policy.max_pixels,
                       args.seed + 1)

    def work(samples) -> float:
        return vlm_flops(config, sizes.patches[samples].tolist(),
                         sizes.llm_tokens[samples].tolist())

    samplers = [stage_sampler(sizes, stage.llm_tokens, stage.vit_tokens, stage.seed, rank,
                              args.dp_size, stage.buffer_size, stage.min_fill)
                for rank in range(args.dp_size)]
    # the naive baseline reads the same rank shards, in their order (taken before packing)
    shards = [sampler.shard(0) for sampler in samplers]
    streams = [endless(sampler) for sampler in samplers]
    packed, counts = [], []
    for _ in tqdm(range(args.dp_steps), desc=f"DP {args.dp_size} packed steps", unit="step",
                  file=sys.stderr):
        ranks = [[i for _ in range(args.dp_microbatches) for i in next(stream)]
                 for stream in streams]
        counts += [len(samples) for samples in ranks]
        flops = [work(samples) for samples in ranks]
        packed.append(max(flops) / np.mean(flops))

    per_step = max(1, round(float(np.mean(counts))))
    steps = min(args.dp_steps, min(len(s) for s in shards) // per_step)
    naive = []
    for step in range(steps):
        flops = [work(shard[step * per_step:(step + 1) * per_step]) for shard in shards]
        naive.append(max(flops) / np.mean(flops))
    out("dp_samples_per_rank_step", float(np.mean(counts)))
    out("dp_imbalance", float(np.mean(packed)))
    out("dp_imbalance_naive", float(np.mean(naive)))


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_logs()
    from megatron_finevit.data.tasks.region_qa_loader import RegionQAConfig

    stage = RegionQAConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=3,
                        help="timed packs (0: only the DP imbalance)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed packs per side first")
    parser.add_argument("--width", type=int, default=256, help="ViT hidden size (FFN 3x, "
                        "heads of 64)")
    parser.add_argument("--vit-layers", type=int, default=2, help="ViT depth")
    parser.add_argument("--llm-width", type=int, default=512, help="LLM hidden size (FFN 3x, "
                        "heads of 64, half as many KV groups)")
    parser.add_argument("--llm-layers", type=int, default=4, help="LLM depth")
    parser.add_argument("--vocab", type=int, default=8192, help="LLM vocabulary")
    parser.add_argument("--llm-tokens", type=int, default=stage.llm_tokens,
                        help="LLM tokens per pack (Stage III's)")
    parser.add_argument("--vit-tokens", type=int, default=stage.vit_tokens,
                        help="ViT patches per pack (Stage III's)")
    parser.add_argument("--max-pixels", type=int, default=1000 * 1000,
                        help="smart_resize pixel cap of the timed samples (Stage III: 1000²)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (None: all cores)")
    parser.add_argument("--dp-size", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--dp-steps", type=int, default=100, help="steps averaged")
    parser.add_argument("--dp-microbatches", type=int, default=1,
                        help="packs per DP rank and step")
    parser.add_argument("--dp-samples-per-rank", type=int, default=2000,
                        help="samples drawn per DP rank for the imbalance measurement")
    parser.add_argument("--dp-preset", default="finevit_vl_1p7b",
                        help="FineViT-VL preset whose FLOPs weigh the DP ranks' work")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def out(name: str, value: float) -> None:
        print(f"{name}={value:.6g}", flush=True)

    dp_imbalance(args, out)
    if args.steps:
        throughput(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
