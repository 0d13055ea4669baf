"""A multi-node Slurm job seen from several of its tasks, without a cluster: ``srun`` over 5 nodes
x 8 GPUs sets SLURM_PROCID (global rank), SLURM_LOCALID (GPU on the node), SLURM_NODEID and the
job's compressed host list. Every task must derive the same world size, the same rendezvous (the
job's FIRST host and a port from the job id) and its own ranks; ``init_distributed`` must hand
exactly that to ``init_process_group`` and bind the local GPU (both captured, never run)."""

import pytest

from megatron_finevit.platform import distributed
from megatron_finevit.platform.device import Backend
from megatron_finevit.platform.distributed import (
    dist_env_from_environ,
    expand_slurm_nodelist,
    slurm_port,
)

NODELIST = "gpu[001-004,010]"
HOSTS = ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]
GPUS_PER_NODE = 8
JOB_ID = "4242"


def task_environ(rank: int) -> dict[str, str]:
    """What srun sets for global task ``rank`` of a 5-node, 40-task job (block distribution:
    tasks 0-7 on the first node, ...)."""
    return {"SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": NODELIST, "SLURM_NNODES": "5",
            "SLURM_NTASKS": "40", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % GPUS_PER_NODE),
            "SLURM_NODEID": str(rank // GPUS_PER_NODE),
            "SLURMD_NODENAME": HOSTS[rank // GPUS_PER_NODE]}


@pytest.mark.parametrize("rank", [0, 7, 8, 21, 32, 39])
def test_every_task_agrees_on_world_and_rendezvous(rank):
    env = dist_env_from_environ(task_environ(rank))
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == \
        (rank, 40, rank % GPUS_PER_NODE, "slurm")
    # the first host of the list, even for tasks on the last node (gpu010)
    assert env.master_addr == "gpu001"
    assert env.master_port == slurm_port(JOB_ID)


def test_all_ranks_distinct_and_local_ranks_cover_each_node():
    envs = [dist_env_from_environ(task_environ(rank)) for rank in range(40)]
    assert sorted(env.rank for env in envs) == list(range(40))
    assert {(env.master_addr, env.master_port) for env in envs} == {("gpu001", slurm_port(JOB_ID))}
    for node in range(5):
        on_node = envs[node * GPUS_PER_NODE:(node + 1) * GPUS_PER_NODE]
        assert [env.local_rank for env in on_node] == list(range(GPUS_PER_NODE))


def test_explicit_master_addr_and_torchrun_inside_the_allocation_win():
    environ = {**task_environ(9), "MASTER_ADDR": "gpu003", "MASTER_PORT": "29400"}
    env = dist_env_from_environ(environ)
    assert (env.master_addr, env.master_port, env.rank) == ("gpu003", 29400, 9)
    # torchrun launched per node by srun: its RANK / WORLD_SIZE describe the job, not Slurm's tasks
    torchrun = {**task_environ(1), "RANK": "17", "WORLD_SIZE": "40", "LOCAL_RANK": "1",
                "MASTER_ADDR": "gpu001", "MASTER_PORT": "29500"}
    env = dist_env_from_environ(torchrun)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (17, 40, 1, "torchrun")


@pytest.mark.parametrize("rank, device", [(0, 0), (13, 5), (39, 7)])
def test_init_distributed_rendezvous_and_gpu_binding(monkeypatch, rank, device):
    calls = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kwargs: calls.update(init=kwargs))
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: GPUS_PER_NODE)
    monkeypatch.setattr(distributed.torch.cuda, "set_device",
                        lambda index: calls.update(device=index))
    env = distributed.init_distributed(Backend("cuda", "nccl"), environ=task_environ(rank))
    assert calls["device"] == device == env.local_rank
    init = calls["init"]
    assert init["init_method"] == f"tcp://gpu001:{slurm_port(JOB_ID)}"
    assert (init["rank"], init["world_size"], init["backend"]) == (rank, 40, "nccl")


def test_rank_outside_the_world_is_refused(monkeypatch):
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kwargs: pytest.fail("must not rendezvous"))
    with pytest.raises(RuntimeError, match="outside world size 40"):
        distributed.init_distributed(Backend("cuda", "nccl"),
                                     environ={**task_environ(0), "SLURM_PROCID": "40"})


@pytest.mark.parametrize("nodelist, hosts", [
    ("a[1-3,5],b7", ["a1", "a2", "a3", "a5", "b7"]),
    ("gpu[008-011]", ["gpu008", "gpu009", "gpu010", "gpu011"]),  # padding kept across 009->010
    ("login1", ["login1"]),
    ("a,b", ["a", "b"]),
    ("x[1-2],y[08-09],z3", ["x1", "x2", "y08", "y09", "z3"]),
    ("rack-1-node[1-2]", ["rack-1-node1", "rack-1-node2"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("n[7]", ["n7"]),
    (NODELIST, HOSTS),
])
def test_expand_tricky_nodelists(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[1-2", "gpu]1", "gpu[a-b]", "gpu[[1]]"])
def test_malformed_nodelists_are_errors(nodelist):
    with pytest.raises(ValueError):
        expand_slurm_nodelist(nodelist)
