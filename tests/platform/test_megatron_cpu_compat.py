"""Each shim of the megatron-core CPU layer is needed (its megatron call fails without it) and
sufficient (the call passes with it); applying is idempotent and CUDA machines are untouched."""

import pytest
import torch

from megatron_finevit.platform import megatron_cpu_compat as compat
from megatron_finevit.testing.compat_probes import PROBES, shim_necessity_world
from megatron_finevit.testing.multirank import run_world


@pytest.fixture(scope="module")
def report():
    return run_world(shim_necessity_world, 2)


def test_every_shim_has_a_probe():
    assert set(PROBES) == {shim.name for shim in compat.SHIMS}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_shim_is_needed_and_works(report, name):
    for rank, per_rank in enumerate(report):
        entry = per_rank[name]
        assert entry["without"] is not None, f"rank {rank}: {name}'s probe passed without the shim"
        assert entry["ok"], f"rank {rank}: {name}'s probe failed with the shim: {entry['with']}"


def test_probe_results_are_right(report):
    rank0 = report[0]
    # causal softmax over zeros: row i spreads uniformly over keys 0..i
    assert rank0["cpu_causal_mask"]["with"] == [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0],
                                                [pytest.approx(1 / 3)] * 3]
    # clip to norm 1 from total norm 4: grads scaled by ~1/4
    assert rank0["cuda_type_name_checks"]["with"] == [pytest.approx(0.5, rel=1e-5)] * 4
    assert report[1]["cuda_sync_is_noop"]["with"] == 16.0  # received ones(2, 1, 8)
    # a resumed torch Adam: every parameter at step 2, none aliased
    assert rank0["torch_adam_step_on_load"]["with"] == [2.0]
    # tied embeddings over 2 pipeline stages: both stages hold the [vocab, hidden] shared weight
    assert [r["tied_embedding_sync_on_cpu"]["with"] for r in report] == [[0, [1024, 64]],
                                                                          [1, [1024, 64]]]
    # d/dx sum(x²) = 2x through megatron's checkpoint (the forward recomputed in backward)
    assert rank0["no_cuda_rng_state"]["with"] == [0.0, 2.0, 4.0]
    # the model-parallel RNG stream is reproducible
    assert rank0["cpu_rng_tracker"]["with"] == report[1]["cpu_rng_tracker"]["with"]


def test_apply_is_idempotent_and_reversible():
    was_applied = [shim.name for shim in compat.SHIMS if shim.applied]  # other in-process tests
    compat.remove_cpu_compat()
    try:
        original = torch.cuda.current_device
        first = compat.apply_cpu_compat(force=True)
        patched = torch.cuda.current_device
        second = compat.apply_cpu_compat(force=True)
        assert first == second == [s.name for s in compat.SHIMS]
        assert patched is not original
        assert torch.cuda.current_device is patched  # not wrapped twice
        compat.remove_cpu_compat()
        assert torch.cuda.current_device is original
    finally:
        compat.remove_cpu_compat()
        for shim in compat.SHIMS:
            if shim.name in was_applied:
                shim.apply()


def test_noop_when_cuda_present(monkeypatch):
    before = [shim.applied for shim in compat.SHIMS]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.apply_cpu_compat() == []
    assert [shim.applied for shim in compat.SHIMS] == before


def test_unknown_shim_name_is_an_error():
    with pytest.raises(ValueError, match="unknown CPU compat shims"):
        compat.apply_cpu_compat(skip=("no_such_shim",))
