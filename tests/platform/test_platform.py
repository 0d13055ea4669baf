"""Platform layer: launcher environments, parallel-config validation, backend choice, seeding, the
multi-rank harness itself, and the smoke tool under a real torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_finevit.platform import ParallelConfig, detect_backend, dist_env_from_environ
from megatron_finevit.platform.distributed import expand_slurm_nodelist, slurm_port
from megatron_finevit.testing.multirank import RankFailure, run_world

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("x[1,3],y[08-09]", ["x1", "x3", "y08", "y09"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_torchrun_env_wins_over_slurm():
    env = dist_env_from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                                 "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, "h", 1234, "torchrun")


def test_slurm_env():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
               "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[004-007]"}
    env = dist_env_from_environ(environ)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == \
        (5, 16, 1, "gpu004", "slurm")
    # every task of the job derives the same port, inside the documented range
    assert env.master_port == slurm_port("123456") == 20000 + 123456 % 10000


def test_slurm_env_without_nodelist_is_a_clear_error():
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST"):
        dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})


def test_single_process_env():
    env = dist_env_from_environ({})
    assert (env.rank, env.world_size, env.launcher, env.master_port) == (0, 1, "single", 0)
    assert dist_env_from_environ({"MASTER_PORT": "29511"}).master_port == 29511


def test_single_process_runs_side_by_side(tmp_path):
    """Two processes started without a launcher on one machine: each initialises its own world
    of one (before, both took port 29500 and the second died with EADDRINUSE)."""
    script = tmp_path / "single.py"
    script.write_text("import sys\n"
                      "from megatron_finevit.platform.distributed import init_distributed\n"
                      "env = init_distributed()\n"
                      "print('up', env.launcher, flush=True)\n"
                      "sys.stdin.read()\n")  # hold the world until the test is done
    environ = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "SLURM_PROCID")}
    procs = [subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=environ) for _ in range(2)]
    try:
        lines = [p.stdout.readline().strip() for p in procs]  # both are up at the same time
    finally:
        outputs = [p.communicate(input="", timeout=120) for p in procs]
    assert lines == ["up single", "up single"], [err[-2000:] for _, err in outputs]
    assert [p.returncode for p in procs] == [0, 0]


@pytest.mark.parametrize("config, world, dims, message", [
    (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6, {}, "not divisible"),
    (ParallelConfig(tensor_parallel=3), 3, {"num_attention_heads": 16}, "does not divide num_attention_heads"),
    (ParallelConfig(tensor_parallel=4), 4, {"num_query_groups": 2}, "does not divide num_query_groups"),
    (ParallelConfig(sequence_parallel=True), 2, {}, "sequence_parallel needs tensor_parallel > 1"),
    (ParallelConfig(pipeline_parallel=4), 4, {"num_layers": 2}, "fewer than the 4 pipeline stages"),
    (ParallelConfig(tensor_parallel=0), 2, {}, "must be >= 1"),
])
def test_parallel_config_validation(config, world, dims, message):
    with pytest.raises(ValueError, match=message):
        config.validate(world, **dims)


def test_parallel_config_valid():
    config = ParallelConfig(tensor_parallel=2, pipeline_parallel=2, context_parallel=2)
    config.validate(16, num_attention_heads=16, num_query_groups=8, num_layers=28)
    assert config.data_parallel(16) == 2


def test_detect_backend_on_cpu():
    assert not torch.cuda.is_available()
    assert detect_backend().dist_backend == "gloo"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        detect_backend("cuda")


# --- the harness ------------------------------------------------------------------------------


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank


def _hang_on_rank_0(rank, world_size):
    if rank == 0:
        torch.distributed.barrier()  # rank 1 never joins: it is stuck elsewhere
    else:
        import time

        time.sleep(600)
    return rank


def _segfault_on_rank_1(rank, world_size):
    if rank == 1:
        import ctypes

        ctypes.string_at(0)  # a native crash: SIGSEGV, no Python exception to report
    torch.distributed.barrier()
    return rank


def _seeds(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_finevit.platform import ParallelConfig, init_parallel, set_seed

    out = {}
    for label, config in {"tp2": ParallelConfig(tensor_parallel=2),
                          "pp2": ParallelConfig(pipeline_parallel=2)}.items():
        init_parallel(config)
        set_seed(7)
        default = torch.rand(3)
        with get_cuda_rng_tracker().fork():  # the tensor-parallel stream
            tp_stream = torch.rand(3)
        out[label] = (default, tp_stream, parallel_state.get_tensor_model_parallel_rank())
    return out


def _rank_and_size(rank, world_size):
    return {"rank": rank, "world": world_size, "initialised": torch.distributed.is_initialized()}


def test_harness_returns_per_rank_results():
    assert run_world(_rank_and_size, 2) == [{"rank": 0, "world": 2, "initialised": True},
                                            {"rank": 1, "world": 2, "initialised": True}]


def test_harness_reports_the_failing_rank_traceback():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 ---.*ValueError: boom from rank one"):
        run_world(_raise_on_rank_1, 2)


def test_harness_reports_where_a_crashed_rank_died():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 ---\nprocess exited with code -11 without "
                       r"reporting; its threads when it died:.*in _segfault_on_rank_1"):
        run_world(_segfault_on_rank_1, 2, timeout_s=60)


def test_harness_times_out_a_hung_collective():
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of a 2-rank world did not finish within 20 s"):
        run_world(_hang_on_rank_0, 2, timeout_s=20)


def _environment_and_parent(rank, world_size):
    import os

    return {"probe": os.environ.get("MULTIRANK_ENV_PROBE"), "ppid": os.getppid()}


def test_harness_ranks_get_the_callers_environment_at_the_call(monkeypatch):
    """Ranks fork from a forkserver started earlier (with another environment): each must still
    see the environment of the call, as spawned ranks did."""
    import os

    run_world(_rank_and_size, 2)  # the forkserver runs by now
    for value in ("first", "second"):
        monkeypatch.setenv("MULTIRANK_ENV_PROBE", value)
        results = run_world(_environment_and_parent, 2)
        assert [r["probe"] for r in results] == [value, value]
    monkeypatch.delenv("MULTIRANK_ENV_PROBE")
    assert [r["probe"] for r in run_world(_environment_and_parent, 2)] == [None, None]
    # forked from the forkserver, not spawned by this process (where Linux has one)
    assert all(r["ppid"] != os.getpid() for r in results)


def test_seeding_keeps_tp_ranks_consistent():
    r0, r1 = run_world(_seeds, 2)
    # TP ranks share the default stream and differ on the tensor-parallel stream.
    assert torch.equal(r0["tp2"][0], r1["tp2"][0])
    assert not torch.equal(r0["tp2"][1], r1["tp2"][1])
    # Pipeline stages draw different default streams.
    assert not torch.equal(r0["pp2"][0], r1["pp2"][0])


def test_smoke_tool_under_torchrun():
    """The README's parallel smoke check, launched exactly as a user would (torchrun env path)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", "29533",
         str(REPO / "tools" / "smoke_parallel.py"), "--tp", "2", "--sequence-parallel", "--steps", "30"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TP 2 x PP 1 x DP 1 + SP" in result.stdout
    assert "in 30 steps: OK" in result.stdout and "tokens/s" in result.stdout
