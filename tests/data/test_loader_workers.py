"""Decode workers in the packed loader: packs, pixels and bad-sample counts equal to decoding in
the training process (with a truncated JPEG and an all-bad pack among them), exact resume with
packs in flight, across a phase switch, and worker lifetime (close, ignored pre-emption signals,
exit with a killed parent)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_finevit.data.loader import PackedImageLoader
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.testing.corrupt_shards import loader_steps, shards_with_broken_packs
from megatron_finevit.testing.multirank import process_alive

PHASES = [(0, ResizePolicy(max_pixels=84 * 84)), (3, ResizePolicy(max_pixels=112 * 112))]
PACK = 128
STEPS = 7  # crosses the phase switch at step 3


def _loader(shard_dir, num_workers=0, **kw):
    return PackedImageLoader(shard_dir, PHASES, PACK, buffer_size=32, seed=5, use_draft=True,
                             mask_ratio=0.75, num_workers=num_workers, **kw)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """64 samples; the second pack holds one truncated JPEG, every sample of the third is one."""
    return shards_with_broken_packs(tmp_path_factory.mktemp("workers"), _loader)



def _assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        assert (a.keys, a.samples, a.pack_number, a.captions) == \
            (b.keys, b.samples, b.pack_number, b.captions)
        assert torch.equal(a.packed.patches, b.packed.patches)
        assert torch.equal(a.packed.cu_seqlens, b.packed.cu_seqlens)
        assert torch.equal(a.packed.grids, b.packed.grids)
        assert torch.equal(a.mim_mask, b.mim_mask)
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))


@pytest.fixture(scope="module")
def reference(shard_dir):
    """The in-process stream and its bad-sample counts."""
    with _loader(shard_dir) as loader:
        return loader_steps(loader, 0, STEPS), loader.counter.totals()


def test_workers_equal_in_process(shard_dir, reference):
    batches, totals = reference
    with _loader(shard_dir, num_workers=2) as loader:
        _assert_same(loader_steps(loader, 0, STEPS), batches)
        assert loader.counter.totals() == totals
    assert totals["skipped_by_reason"]["truncated_image"] >= 2  # the bad data was reached
    assert [b.pack_number for b in batches[:3]] == [1, 2, 4]    # pack 3 (all bad) skipped


@pytest.mark.parametrize("stop_at", [2, 4])
def test_resume_with_packs_in_flight(shard_dir, reference, stop_at):
    """The state saved while workers decode the next packs is the consumer's: a fresh loader
    (with workers or without) continues exactly, and the saving loader is not disturbed."""
    batches, _ = reference
    with _loader(shard_dir, num_workers=2) as first:
        _assert_same(loader_steps(first, 0, stop_at), batches[:stop_at])
        assert len(first._in_flight) > 0  # prefetch under way
        state = first.state_dict()
        _assert_same(loader_steps(first, stop_at, STEPS), batches[stop_at:])
    for workers in (2, 0):
        with _loader(shard_dir, num_workers=workers) as resumed:
            resumed.load_state_dict(state)
            _assert_same(loader_steps(resumed, stop_at, STEPS), batches[stop_at:])


def test_epoch_equals_in_process(shard_dir):
    with _loader(shard_dir) as plain, _loader(shard_dir, num_workers=2) as pooled:
        want, got = plain.epoch(), pooled.epoch()
        assert [b.keys for b in got] == [b.keys for b in want]
        assert pooled.counter.totals() == plain.counter.totals()
        assert pooled.state_dict() == plain.state_dict()  # the next epoch starts, nothing ahead


def _wait_until(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _ignores(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        mask = next(line.split()[1] for line in status if line.startswith("SigIgn:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


def test_workers_ignore_signals_and_close(shard_dir, reference):
    """A pre-emption signal reaching the workers does not break the step; close() stops them
    and the loader goes on from its position with new ones."""
    batches, _ = reference
    loader = _loader(shard_dir, num_workers=2)
    _assert_same(loader_steps(loader, 0, 1), batches[:1])
    pids = loader._pool.pids
    assert len(pids) == 2
    for pid in pids:  # initialised (signal dispositions set) before it is signalled
        assert _wait_until(lambda: _ignores(pid, signal.SIGTERM))
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    _assert_same(loader_steps(loader, 1, 3), batches[1:3])
    loader.close()
    assert _wait_until(lambda: not any(process_alive(pid) for pid in pids))
    _assert_same(loader_steps(loader, 3, 5), batches[3:5])
    assert set(loader._pool.pids).isdisjoint(pids)
    loader.close()


_KILLED_PARENT = """
import os, signal, sys
from megatron_finevit.data.decode_workers import DecodePool, DecodeSettings, SampleLocation
from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.resize import ResizePolicy

if __name__ == "__main__":
    pool = DecodePool(1)
    settings = DecodeSettings(ResizePolicy(), Normalization(), False)
    pool.submit([], settings).result()
    print(pool.pids[0], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_with_a_killed_parent(tmp_path):
    script = tmp_path / "killed_parent.py"
    script.write_text(_KILLED_PARENT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    worker = int(out.stdout.split()[0])
    assert _wait_until(lambda: not process_alive(worker)), f"worker {worker} outlived its parent"


def test_rejects_negative_workers(shard_dir):
    with pytest.raises(ValueError, match="num_workers=-1 must be an integer >= 0"):
        _loader(shard_dir, num_workers=-1)
