"""User errors of ``python -m megatron_finevit.train``: every problem on its own line, exit 2,
no traceback, before any process group or model exists — at 1 rank, and at 2 ranks under
torchrun and under srun's environment, where every rank exits 2 and only global rank 0 prints.
A damaged checkpoint is reported naming its directory and the bad file."""

import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, error_lines, run_cli

TRAIN = ("-m", "megatron_finevit.train")


def assert_lines(lines: list[str], expected: list[str]) -> None:
    """Exactly one line per expected problem (each line starts with its expected text)."""
    assert len(lines) == len(expected), "\n".join(lines)
    for start in expected:
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)


def test_one_rank_lists_every_problem(tmp_path):
    missing = tmp_path / "missing"
    proc = run_cli(*TRAIN, "--config", "examples/stage2_contrastive_tiny.yaml",
                   "stage_config.data.max_pixel=5", "stage_config.text=tiny_textt",
                   "parallel.tensor_parallel=3", f"stage_config.data.dir={missing}/train",
                   f"stage_config.eval_data_dir={missing}/eval",
                   f"stage_config.tokenizer={missing}/tok.model",
                   f"checkpoint.dir={tmp_path}/ckpt", f"checkpoint.load_dir={missing}/stage1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    # nothing but the problems: no log line of a process group or a model being built
    assert_lines(error_lines(proc.stderr), [
        "config error: stage_config.data.max_pixel: unknown key (did you mean max_pixels?)",
        "config error: stage_config.text: unknown preset 'tiny_textt' (did you mean tiny_text?)",
        "config error: stage_config.vit: tensor_parallel=3 does not divide num_attention_heads=4",
        "config error: parallel: world size 1 is not divisible by tensor_parallel x "
        "pipeline_parallel x context_parallel = 3 x 1 x 1 = 3",
        f"config error: stage_config.data.dir={missing}/train: no such directory",
        f"config error: stage_config.eval_data_dir={missing}/eval: no such directory",
        f"config error: stage_config.tokenizer={missing}/tok.model: no such file",
        f"checkpoint error: checkpoint.load_dir={missing}/stage1: no such directory"])


def torchrun_exit_codes(summary: str) -> dict[int, int]:
    """{global rank: exit code} from torchrun's failure summary."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", summary)
    return {int(rank): int(code) for rank, code in found}


def test_torchrun_two_ranks_exit_2_and_only_rank_0_prints(damaged_checkpoint, tmp_path):
    """torchrun reports failed workers itself (its own traceback, exit 1): the workers' streams
    are read from its log directory, their exit codes from its summary. Once one worker has
    failed torchrun stops the others (SIGTERM), so rank 1 either exited 2 by itself or was
    stopped, never printing; the srun test below sees every task's own exit code."""
    cut = damaged_checkpoint("cut_data")
    logs = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--log-dir", str(logs), "--redirects", "3", *TRAIN, "stage=toy_lm",
         "global_batch_size=3", "precision=fp32", "stage_config.seq_lenght=8",
         f"checkpoint.load_dir={cut.parent}"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    codes = torchrun_exit_codes(proc.stderr)
    assert codes[0] == 2 and codes.get(1, 2) in (2, -signal.SIGTERM), proc.stderr[-3000:]
    rank0, rank1 = (next(logs.glob(f"*/attempt_0/{rank}/stderr.log")).read_text()
                    for rank in (0, 1))
    assert rank1 == "" and "Traceback" not in rank0
    assert_lines(error_lines(rank0), [
        "config error: stage_config.seq_lenght: unknown key (did you mean seq_length?)",
        "config error: global_batch_size=3 micro-batches do not split evenly over "
        "data_parallel=2 ranks: use a multiple of 2, e.g. 2 or 4",
        f"checkpoint error: checkpoint.load_dir: {cut}/__0_0.distcp is cut off: 1000 bytes, "
        ".metadata expects at least"])


def test_srun_tasks_exit_2_and_only_procid_0_prints(damaged_checkpoint, tmp_path):
    """Two tasks with the variables srun sets (SLURM_PROCID/NTASKS, no torchrun ones), as
    ``slurm/launch.sh`` starts them; srun passes the tasks' exit code 2 through."""
    resume_dir = damaged_checkpoint("dangling_latest").parent
    missing = tmp_path / "missing"
    args = [*TRAIN, "--config", "examples/stage1_mim_tiny.yaml", "stage_config.vit=tiny_vitt",
            f"stage_config.data.dir={missing}/train", f"stage_config.eval_data_dir={missing}/eval",
            f"stage_config.teacher_dir={missing}/teacher", f"checkpoint.dir={resume_dir}"]
    tasks = [subprocess.Popen([sys.executable, *args], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                                            SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242",
                                            SLURM_JOB_NODELIST="localhost"))
             for rank in (0, 1)]
    (out0, err0), (out1, err1) = (task.communicate(timeout=300) for task in tasks)
    assert [task.returncode for task in tasks] == [2, 2]
    assert out0 == out1 == err1 == "" and "Traceback" not in err0
    assert_lines(error_lines(err0), [
        "config error: stage_config.vit: unknown preset 'tiny_vitt' (did you mean tiny_vit?)",
        f"config error: stage_config.data.dir={missing}/train: no such directory",
        f"config error: stage_config.eval_data_dir={missing}/eval: no such directory",
        f"config error: stage_config.teacher_dir={missing}/teacher: no such directory",
        f"checkpoint error: checkpoint.dir: {resume_dir}/latest names iter_0000009, which does "
        "not exist"])


@pytest.mark.parametrize("how,bad_file", [("cut_index", ".metadata"),
                                          ("cut_data", "__0_0.distcp"),
                                          ("no_metadata_json", "metadata.json"),
                                          ("bad_metadata_json", "metadata.json")])
def test_damaged_checkpoint_is_named_at_preflight_and_at_load(damaged_checkpoint, how, bad_file):
    """Preflight names the file from the checkpoint's own index; a load of the same directory
    (megatron's, as ``load_checkpoint`` calls it) raises the same one-line CheckpointError
    instead of EOFError / torch's CheckpointException."""
    from megatron.core import dist_checkpointing

    from megatron_finevit.training.checkpoint_files import (
        CheckpointError,
        checkpoint_file_problems,
        reading_checkpoint,
    )

    copy = damaged_checkpoint(how)
    problems = checkpoint_file_problems(copy)
    assert len(problems) == 1 and problems[0].startswith(f"{copy}/{bad_file} "), problems
    with pytest.raises(CheckpointError) as raised:
        with reading_checkpoint(copy):
            dist_checkpointing.load_common_state_dict(str(copy))
    assert raised.value.problems == problems


def test_whole_checkpoint_and_preflight_messages(toy_checkpoint):
    """The intact checkpoint passes and loads; an unknown stage and a global batch that the
    data-parallel ranks cannot split are one line each."""
    from megatron.core import dist_checkpointing

    from megatron_finevit.config.loader import load_config
    from megatron_finevit.config.train import TrainConfig
    from megatron_finevit.training.checkpoint_files import (
        checkpoint_file_problems,
        reading_checkpoint,
    )
    from megatron_finevit.training.preflight import find_problems

    assert checkpoint_file_problems(toy_checkpoint) == []
    with reading_checkpoint(toy_checkpoint):
        common = dist_checkpointing.load_common_state_dict(str(toy_checkpoint))["common"]
    assert common["train_state"]["step"] == 1
    assert find_problems(TrainConfig(stage="mimm"), 1).problems == [
        "stage: unknown stage 'mimm' (did you mean mim?); choose one of "
        "['align', 'contrastive', 'mim', 'sft', 'toy_lm']"]
    paper = load_config(TrainConfig, REPO / "examples/stage1_mim.yaml",
                        ["global_batch_size=320", "samples_per_step=0",
                         "parallel.pipeline_parallel=1"])
    assert find_problems(paper, 128).problems == [
        "global_batch_size=320 micro-batches do not split evenly over data_parallel=128 ranks: "
        "use a multiple of 128, e.g. 256 or 384"]
