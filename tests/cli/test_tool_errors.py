"""User errors of the other entry points, run as a user runs them: ``evaluate`` (a missing or
damaged checkpoint and a missing data directory, all reported at once), ``tools/build_index.py``
and ``tools/curate.py`` (a missing or empty shard directory): one line each, exit 2, no
traceback."""

from conftest import error_lines, run_cli

EVALUATE = ("-m", "megatron_finevit.evaluate")


def assert_user_error(proc, expected: list[str]) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.startswith(start), (line, start)


def test_evaluate_missing_checkpoint_and_data(tmp_path):
    proc = run_cli(*EVALUATE, "--checkpoint", f"{tmp_path}/ckpt", "--data", f"{tmp_path}/eval")
    assert_user_error(proc, [f"config error: --data={tmp_path}/eval: no such directory",
                             f"checkpoint error: --checkpoint={tmp_path}/ckpt: no such directory"])


def test_evaluate_damaged_checkpoint(damaged_checkpoint, tmp_path):
    cut = damaged_checkpoint("cut_index")
    proc = run_cli(*EVALUATE, "--checkpoint", str(cut.parent), "--data", f"{tmp_path}/eval")
    assert_user_error(proc, [f"config error: --data={tmp_path}/eval: no such directory",
                             f"checkpoint error: --checkpoint: {cut}/.metadata cannot be read"])


def test_build_index_missing_or_empty_dir(tmp_path):
    assert_user_error(run_cli("tools/build_index.py", f"{tmp_path}/shards"),
                      [f"error: SHARD_DIR {tmp_path}/shards: no such directory"])
    assert_user_error(run_cli("tools/build_index.py", str(tmp_path)),
                      [f"error: SHARD_DIR {tmp_path} holds no shards named PREFIX-NNNNNN.tar"])


def test_curate_missing_input_dir(tmp_path):
    assert_user_error(run_cli("tools/curate.py", f"{tmp_path}/in", f"{tmp_path}/out"),
                      [f"error: IN_SHARD_DIR {tmp_path}/in: no such directory"])
