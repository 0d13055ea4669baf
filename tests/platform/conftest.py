"""The local Slurm cluster the launcher tests share (one per session: it takes ~7 s to start)."""

import pytest


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    from megatron_finevit.testing.local_slurm import LocalSlurm

    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
