"""One source of truth for a pack's contents across the pipeline stages of a model replica.

Every pipeline stage of a replica runs its own loader, but only the first stage decodes every
image it embeds; layout-only stages (``decode_pixels=False``) would keep a sample whose body
fails to decode (the index reads only the header) and drop nothing, so their captions and
attention segments would stop matching the activations, and an all-bad pack would shift their
micro-batch streams. So the first stage's loader *decides*: it loads and decodes as usual
(whatever decoder it uses), and broadcasts for each micro-batch the pack's number in the
sampler's stream, the sample indices that survived and their patch grids; the other stages build
their batches from exactly that (``PackedImageLoader.prepare`` / ``epoch``).

When: megatron's pipeline schedules call every stage's data iterator once per micro-batch, but
not at the same moment (the last stage receives activations before its forward step, the first
sends only after its own), so a collective inside ``next()`` would deadlock. The stages agree on a
whole step's micro-batches before the schedule starts (``Stage.on_step``), and on a whole
evaluation split before its forward-only pass.

Failures: if the first stage's loading raises (e.g. the bad-sample budget is exceeded), it still
broadcasts an abort flag before re-raising, so the other stages raise too instead of waiting in
the collective.

Message (int64, one broadcast of its length, one of its body):
``[aborted, end_pack_number, num_choices, (pack_number, n, sample_1..n, h_1, w_1 .. h_n, w_n)*]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PipelineGroup:
    """The ranks holding one replica's pipeline stages (a process group) and the global rank of
    its first stage, whose loader decides."""

    group: dist.ProcessGroup
    leader: int
    device: torch.device = torch.device("cpu")  # where the collective's tensors live (NCCL: GPU)

    @property
    def is_leader(self) -> bool:
        return dist.get_rank() == self.leader


@dataclass(frozen=True)
class PackChoice:
    """What the first stage made of one pack: its number in the sampler's stream (1-based count
    of packs drawn, which also seeds the MIM mask), the samples kept in pack order and their
    patch grids ``(h, w)``."""

    pack_number: int
    samples: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Decision:
    """The first stage's choices for consecutive micro-batches; ``end_pack_number`` is how many
    packs its sampler had drawn after them (all-bad packs after the last choice included), so
    every stage's sampler ends where the first stage's did."""

    choices: tuple[PackChoice, ...]
    end_pack_number: int
    aborted: bool = False


def encode_decision(decision: Decision) -> torch.Tensor:
    """``Decision`` -> int64 ``[L]`` (the message layout of the module docstring)."""
    body = [int(decision.aborted), decision.end_pack_number, len(decision.choices)]
    for choice in decision.choices:
        body += [choice.pack_number, len(choice.samples), *choice.samples]
        body += [side for grid in choice.grids for side in grid]
    return torch.tensor(body, dtype=torch.int64)


def decode_decision(message: torch.Tensor) -> Decision:
    values = message.tolist()
    aborted, end, count = values[:3]
    pos, choices = 3, []
    for _ in range(count):
        number, n = values[pos:pos + 2]
        samples = tuple(values[pos + 2:pos + 2 + n])
        flat = values[pos + 2 + n:pos + 2 + 3 * n]
        choices.append(PackChoice(number, samples, tuple(zip(flat[0::2], flat[1::2]))))
        pos += 2 + 3 * n
    if pos != len(values):
        raise ValueError(f"malformed pack decision: {len(values) - pos} trailing values")
    return Decision(tuple(choices), end, bool(aborted))


def broadcast_decision(decision: Decision | None, pipeline: PipelineGroup) -> Decision:
    """The leader's ``decision`` on every rank of ``pipeline`` (pass None off the leader)."""
    if pipeline.is_leader:
        message = encode_decision(decision).to(pipeline.device)
        length = torch.tensor([message.numel()], dtype=torch.int64, device=pipeline.device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=pipeline.device)
    dist.broadcast(length, src=pipeline.leader, group=pipeline.group)
    if not pipeline.is_leader:
        message = torch.empty(int(length.item()), dtype=torch.int64, device=pipeline.device)
    dist.broadcast(message, src=pipeline.leader, group=pipeline.group)
    return decision if pipeline.is_leader else decode_decision(message.cpu())
