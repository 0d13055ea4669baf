"""What the FineViT stages share: the encoder's config at the run's parallel layout, the packed
image loader for a data-parallel rank, a pack's encoder input for this (CP, TP) rank, and the
FLOP count of a pack.

Data under the parallel layout: under context parallelism every image is padded to a multiple
of 2·cp before the encoder, so the loader budgets images at that padded length
(``data.image_token_multiple``); under pipeline parallelism the stages' loaders agree on each
step's micro-batches before megatron's schedule (``on_step`` -> ``PackedImageLoader.prepare``):
the first stage decides what decoded, the others follow (``data.pack_agreement``).

FLOPs (``planning.flops.transformer_flops``; forward + backward = 3× forward, matmuls only): per
image of ``n`` tokens, ``2 · params · n`` for the weights and ``4 · n² · h`` per layer for the
attention scores and their weighted sum; each image attends only to itself, so the quadratic term
is per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_finevit.config.presets import preset_config
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.config.vit import VIT_PRESETS, FineViTConfig
from megatron_finevit.data.decode_dali_packs import decoder_problems
from megatron_finevit.data.loader import PackedImageBatch, PackedImageLoader
from megatron_finevit.data.pack_agreement import PipelineGroup
from megatron_finevit.data.resize import DEFAULT_MIN_PIXELS, ResizePolicy
from megatron_finevit.models.attention import cp_padded_length
from megatron_finevit.planning.flops import transformer_flops
from megatron_finevit.training.dry_run import MicrobatchPhase
from megatron_finevit.training.preflight import InputPath


@dataclass
class DataSection:
    """Where the images come from and how they are packed."""

    dir: str = ""                      # shard directory with index.zarr (tools/build_index.py)
    pack_tokens: int = 1024            # ViT tokens per micro-batch (one pack), fixed
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = 256 * 256
    # [[step, max_pixels], ...]: raise the resolution at these steps (Stage II: 336² -> 448²)
    max_pixels_schedule: list = field(default_factory=list)
    buffer_size: int = 512             # samples packed together by first-fit-decreasing
    min_fill: float = 0.9
    # "auto": DALI where nvidia.dali imports, else PIL (the choice is logged); "dali" | "pil".
    # Same packs and skips either way; pixels within the decoder bound. With DALI,
    # num_workers is its CPU thread count.
    decoder: str = "auto"
    use_draft: bool = False            # faster reduced-scale JPEG decode
    # processes decoding the next packs while the step computes (0: in the training process);
    # packs, pixels, bad-sample counts and resume are the same for any number
    num_workers: int = 0
    # Mean ViT tokens per image, one per resolution phase (max_pixels, then each schedule entry):
    # an estimate for `--dry-run` where data.dir has no index (with one, the index is used).
    mean_tokens_per_sample: list[float] = field(default_factory=list)
    # Each image's cost in the pack budget is rounded up to this multiple; 0: what the encoder
    # pads it to (2·cp under context parallelism, else 1). A multiple of 2·cp; a larger one
    # keeps the packs of runs at different CP sizes identical.
    image_token_multiple: int = 0
    # set at start-up from samples_per_step (VisionStage.fit_fill_tokens), one per resolution
    # phase: the tokens the sampler fills a pack with (the rest of pack_tokens is padding)
    fill_tokens: list[int] = field(default_factory=list)


def schedule_problems(key: str, schedule: list, value_name: str) -> list[str]:
    """A step schedule ``[[step, value], ...]`` must hold integer pairs at increasing steps
    after 0 (step 0's value is the section's own setting)."""
    if not all(isinstance(e, (list, tuple)) and len(e) == 2
               and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
               for e in schedule):
        return [f"{key}={schedule} must be [[step, {value_name}], ...] (integers)"]
    steps = [0] + [step for step, _ in schedule]
    if steps != sorted(set(steps)):
        return [f"{key}={schedule} must list increasing steps after 0"]
    return []


def _data_problems(d: DataSection) -> list[str]:
    problems = schedule_problems("stage_config.data.max_pixels_schedule", d.max_pixels_schedule,
                                 "max_pixels")
    phases = len(d.max_pixels_schedule) + 1
    means = d.mean_tokens_per_sample
    if means and (len(means) != phases or min(means) <= 0):
        problems.append(f"stage_config.data.mean_tokens_per_sample={means} needs one positive "
                        f"value per resolution phase ({phases})")
    problems += decoder_problems(d.decoder, d.num_workers)
    fills = d.fill_tokens
    if fills and (len(fills) != phases or not all(
            isinstance(f, int) and 0 < f <= d.pack_tokens for f in fills)):
        problems.append(f"stage_config.data.fill_tokens={fills} needs one integer in (0, "
                        f"pack_tokens={d.pack_tokens}] per resolution phase ({phases}); "
                        "samples_per_step sets it")
    return problems


def packed_samples_per_pack(sizes, pack_tokens: int, buffer_size: int, min_fill: float,
                            seed: int, data_parallel: int = 1, max_packs: int = 512) -> float:
    """Mean samples per pack over the first ``max_packs`` packs ``PackedBatchSampler`` makes of
    ``sizes`` ``[n]`` on data-parallel rank 0 of ``data_parallel`` (its shard's ends included;
    oversize samples skipped as in training)."""
    from megatron_finevit.data.packing import PackedBatchSampler

    sampler = PackedBatchSampler(sizes, pack_tokens, buffer_size=buffer_size, seed=seed,
                                 min_fill=min_fill, dp_size=min(data_parallel, len(sizes)))
    counts = [len(pack) for _, pack in zip(range(max_packs), sampler)]
    return sum(counts) / max(len(counts), 1)


def shard_paths(data: DataSection, eval_data_dir: str | None) -> list[InputPath]:
    """The indexed shard directories a vision stage reads (for ``training.preflight``)."""
    return [InputPath(key, path, "shards") for key, path in (
        ("stage_config.data.dir", data.dir), ("stage_config.eval_data_dir", eval_data_dir))
        if path]


class VisionStage:
    """Base of the stages that train FineViT on packed images (not a stage by itself)."""

    name = "vision"

    def __init__(self, run: TrainConfig, cfg, problems: list[str]):
        """Check the encoder and data settings of ``cfg`` (the subclass's parsed
        ``stage_config``) at the run's layout, appending one line per problem to ``problems``;
        the subclass adds its own and raises them all together. Reads no file."""
        self.run, self.cfg = run, cfg
        p = run.parallel
        self.vit: FineViTConfig | None = preset_config(
            VIT_PRESETS, cfg.vit, cfg.vit_overrides, "stage_config.vit",
            "stage_config.vit_overrides", problems)
        if self.vit is not None:
            problems += [f"stage_config.vit: {problem}" for problem in self.vit.problems(
                p.tensor_parallel, p.pipeline_parallel, p.context_parallel)]
        d = cfg.data
        if not d.dir:
            problems.append("stage_config.data.dir must name an indexed shard directory")
        multiple = 2 * p.context_parallel * (p.tensor_parallel if p.sequence_parallel else 1)
        if d.pack_tokens % multiple:
            problems.append(f"stage_config.data.pack_tokens={d.pack_tokens} must be a multiple "
                            f"of {multiple} (2·cp·sp) for this layout")
        padded = cp_padded_length(1, p.context_parallel)  # the padding unit of one image
        if d.image_token_multiple < 0 or d.image_token_multiple % padded:
            problems.append(f"stage_config.data.image_token_multiple={d.image_token_multiple} "
                            f"must be 0 or a multiple of {padded} (2·cp: the encoder pads every "
                            "image to it)")
        self.image_token_multiple = d.image_token_multiple or padded
        problems += _data_problems(d)
        self.step = 0
        self.loader: PackedImageLoader | None = None

    # --- model shapes -------------------------------------------------------------------------

    def model_dims(self) -> dict[str, int]:
        return {"num_attention_heads": self.vit.num_attention_heads,
                "num_query_groups": self.vit.num_attention_heads,
                "num_layers": self.vit.num_layers}

    def transformer_config(self):
        p = self.run.parallel
        return self.vit.to_transformer_config(
            tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel,
            context_parallel=p.context_parallel, sequence_parallel=p.sequence_parallel,
            params_dtype=self.run.params_dtype(), **p.transformer_overrides())

    def sequence_shape(self) -> tuple[int, int]:
        return self.cfg.data.pack_tokens, 1

    # --- data ---------------------------------------------------------------------------------

    def phases(self) -> list[tuple[int, ResizePolicy]]:
        d = self.cfg.data
        schedule = [(0, d.max_pixels)] + [(int(s), int(m)) for s, m in d.max_pixels_schedule]
        return [(step, ResizePolicy(min_pixels=d.min_pixels, max_pixels=pixels))
                for step, pixels in schedule]

    def microbatch_phases(self, data_parallel: int = 1) -> list[MicrobatchPhase]:
        """Images per pack in each resolution phase (``--dry-run``, ``samples_per_step``): with
        the index of ``data.dir`` here, the mean over the first packs the sampler makes of the
        index's sizes under the phase's policy on data-parallel rank 0 of ``data_parallel``
        (``index, packed``: what training will see, shard ends included);
        else ``pack_tokens · min_fill`` (the packer emits packs at least that full, so this
        leans low) over ``data.mean_tokens_per_sample``, else over the largest image the phase
        allows (then the images per pack are a lower bound). Packs are filled to
        ``data.fill_tokens`` where ``samples_per_step`` set it."""
        from megatron_finevit.data.index import INDEX_NAME, load_index

        d = self.cfg.data
        index = load_index(d.dir) if d.dir and (Path(d.dir) / INDEX_NAME).is_dir() else None
        phases = []
        for number, (start, policy) in enumerate(self.phases()):
            sizes = self._phase_sizes(index, policy) if index is not None else None
            packable = sizes[sizes <= d.pack_tokens] if sizes is not None else []
            if len(packable):
                mean, source = float(packable.mean()), "index, packed"
                fill = d.fill_tokens[number] if d.fill_tokens else d.pack_tokens
                fill_detail = {"fill_tokens": fill} if d.fill_tokens else {}
                phases.append(MicrobatchPhase(start, self._samples_per_pack(
                    sizes, fill, data_parallel), {
                    "max_pixels": policy.max_pixels, "mean_tokens_per_sample": round(mean, 1),
                    "samples_estimate": source, **fill_detail}))
                continue
            if d.mean_tokens_per_sample:
                mean, source = d.mean_tokens_per_sample[number], "config"
            else:
                mean, source = policy.max_pixels // policy.patch_size ** 2, "max_pixels"
            phases.append(MicrobatchPhase(start, d.pack_tokens * d.min_fill / mean, {
                "max_pixels": policy.max_pixels, "mean_tokens_per_sample": round(mean, 1),
                "samples_estimate": source, "pack_fill": d.min_fill}))
        return phases

    def fit_fill_tokens(self, samples_per_step: int, data_parallel: int) -> bool:
        """Set ``data.fill_tokens`` so that whole packs per DP rank hold ``samples_per_step``.

        Per resolution phase, ``batch_schedule.fill_for_samples`` over the packs the sampler makes
        of the index's sizes (on DP rank 0 of ``data_parallel``). Rounding the pack count
        instead would miss by up to half a pack per rank (±2% at Stage II's 26 packs a rank); the
        price is the padding, < 1 / packs per rank. False (nothing set) when the index is not
        here: the count is then rounded from the estimate."""
        from megatron_finevit.data.index import INDEX_NAME, load_index
        from megatron_finevit.training.batch_schedule import fill_for_samples

        d = self.cfg.data
        if not (d.dir and (Path(d.dir) / INDEX_NAME).is_dir()):
            return False
        index, fills = load_index(d.dir), []
        for _, policy in self.phases():
            sizes = self._phase_sizes(index, policy)
            packable = sizes[sizes <= d.pack_tokens]
            if not len(packable):
                return False
            fills.append(fill_for_samples(
                lambda budget, sizes=sizes: self._samples_per_pack(sizes, budget, data_parallel),
                samples_per_step, data_parallel, int(packable.max()), d.pack_tokens))
        d.fill_tokens = fills
        return True

    def _phase_sizes(self, index, policy: ResizePolicy):
        """Each indexed image's pack cost under ``policy``, as the loader counts it."""
        from megatron_finevit.data.loader import policy_sizes

        return policy_sizes(index, policy, self.cfg.data.pack_tokens + 1,
                            self.image_token_multiple)

    def _samples_per_pack(self, sizes, fill_tokens: int, data_parallel: int) -> float:
        d = self.cfg.data
        return packed_samples_per_pack(sizes, fill_tokens, d.buffer_size, d.min_fill,
                                       self.run.seed, data_parallel)

    def make_loader(self, data_dir: str, dp_rank: int, dp_size: int, decode_pixels: bool,
                    mask_ratio: float | None = None, seed: int | None = None,
                    fill: bool = False) -> PackedImageLoader:
        """A loader of ``data_dir``; ``fill``: the training loader (``data.fill_tokens``)."""
        d = self.cfg.data
        return PackedImageLoader(
            data_dir, self.phases(), d.pack_tokens, dp_rank=dp_rank, dp_size=dp_size,
            seed=self.run.seed if seed is None else seed, buffer_size=d.buffer_size,
            min_fill=d.min_fill, mask_ratio=mask_ratio, decode_pixels=decode_pixels,
            decoder=d.decoder, use_draft=d.use_draft, token_multiple=self.image_token_multiple,
            pipeline=pipeline_group(), num_workers=d.num_workers,
            fill_tokens=d.fill_tokens if fill else None)

    def encoder_input(self, batch: PackedImageBatch):
        """The pack laid out for this rank (CP chunks, SP split, fixed size)."""
        from megatron.core import parallel_state as ps

        from megatron_finevit.models.vit import prepare_encoder_input

        p = self.run.parallel
        return prepare_encoder_input(
            batch.packed, cp_size=p.context_parallel, cp_rank=ps.get_context_parallel_rank(),
            sp_size=p.tensor_parallel if p.sequence_parallel else 1,
            total_tokens=self.cfg.data.pack_tokens)

    def vit_flops(self, batch: PackedImageBatch) -> float:
        return transformer_flops(self.vit.num_parameters(), batch.image_tokens,
                                 self.vit.num_layers, self.vit.hidden_size)

    def on_step(self, step: int, model_chunks: list, optimizer) -> None:
        self.step = step
        if self.loader is not None:
            self.loader.set_step(step)
            # the pipeline stages agree on this step's micro-batches before the schedule runs
            self.loader.prepare(self.run.global_batch_at(step) // self.loader.dp_size)


def pipeline_group() -> PipelineGroup | None:
    """This replica's pipeline group for the loaders' agreement, None without PP."""
    from megatron.core import parallel_state as ps

    from megatron_finevit.platform.distributed import collective_device

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return PipelineGroup(ps.get_pipeline_model_parallel_group(),
                         ps.get_pipeline_model_parallel_first_rank(), collective_device())


def forward_over_split(stage: VisionStage, model_chunks: list, data_dir: str, forward,
                       mask_ratio: float | None = None,
                       pixels_on_last_stage: bool = False) -> list | None:
    """One pass over a held-out split, this data-parallel rank's share, through megatron's
    forward-only schedule (so pipeline parallelism works as in training).

    ``forward(batch, model) -> (output, collect)`` builds one micro-batch's forward;
    ``collect(output)`` runs on the last pipeline stage and returns what to keep. The loader is
    seeded (seed 0) and set to the current step's resolution, so every evaluation sees the same
    packs and, with ``mask_ratio``, the same masks; pixels are decoded on the first stage (and on
    the last with ``pixels_on_last_stage``). Returns the kept values in order on the last stage,
    None elsewhere.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    loader = stage.make_loader(data_dir, ps.get_data_parallel_rank(),
                               ps.get_data_parallel_world_size(),
                               decode_pixels=ps.is_pipeline_first_stage()
                               or (pixels_on_last_stage and ps.is_pipeline_last_stage()),
                               mask_ratio=mask_ratio, seed=0)
    loader.set_step(stage.step)
    batches = loader.epoch()  # a collective: the pipeline stages agree on the packs
    kept = []

    def forward_step(data_iterator, model):
        output, collect = forward(next(data_iterator), model)

        def keep(out):
            kept.append(collect(out))
            return torch.zeros(()), {}

        return output, keep

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model_chunks,
        num_microbatches=len(batches), seq_length=stage.cfg.data.pack_tokens,
        micro_batch_size=1, forward_only=True)
    return kept if ps.is_pipeline_last_stage() else None
