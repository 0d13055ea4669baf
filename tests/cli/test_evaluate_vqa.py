"""``python -m megatron_finevit.evaluate --task vqa`` as a user runs it: on a checkpoint that is
not an SFT run it exits 2 with one clear line and no traceback; on a tiny SFT checkpoint it prints
the VQA table and writes the dict the trainer's own evaluation at the end of the run gives for
the saved weights and records in ``eval.results_json`` (the run's config, e.g.
eval_max_new_tokens, read from the checkpoint), in one process and under torchrun with 2
data-parallel ranks; the table's layout."""

from conftest import error_lines, free_port, run_cli


def test_vqa_task_on_a_non_sft_checkpoint(toy_checkpoint, tmp_path):
    from megatron_finevit.data.synthetic import make_synthetic_shards
    from megatron_finevit.data.synthetic_vqa import write_vqa_shards

    make_synthetic_shards(tmp_path / "src", 4, progress=False)
    write_vqa_shards(tmp_path / "src", tmp_path / "vqa", "eval", progress=False)
    proc = run_cli("-m", "megatron_finevit.evaluate", "--checkpoint", str(toy_checkpoint.parent),
                   "--data", str(tmp_path / "vqa"), "--task", "vqa")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        "config error: --task vqa does not apply to a toy_lm run: give an SFT (sft) checkpoint "
        "or --config"]


def test_vqa_table_puts_each_kind_beside_its_baseline():
    from megatron_finevit.evaluate import format_table

    results = {"vqa_acc": 0.5, "vqa_baseline": 0.25, "vqa_n": 8, "vqa_acc_color": 0.75,
               "vqa_baseline_color": 0.25, "vqa_n_color": 4, "vqa_acc_count": 0.25,
               "vqa_baseline_count": 0.25, "vqa_n_count": 4, "vqa_skipped": 1}
    assert format_table(results).splitlines() == [
        "held-out VQA (exact match)       n    model  baseline",
        "color                            4    75.0%     25.0%",
        "count                            4    25.0%     25.0%",
        "all                              8    50.0%     25.0%",
        "(baseline: the most frequent answer of each kind; 1 samples skipped)"]


def test_vqa_task_on_a_tiny_sft_checkpoint(tmp_path):
    import json

    from megatron_finevit.data.index import build_index
    from megatron_finevit.data.synthetic import make_synthetic_shards
    from megatron_finevit.data.synthetic_vqa import write_vqa_shards
    from megatron_finevit.testing.multirank import run_world
    from megatron_finevit.testing.stage_assets import train_tiny_sft_and_evaluate

    assets = {}
    for split, images, seed in (("train", 16, 0), ("eval", 6, 1)):
        make_synthetic_shards(tmp_path / f"src_{split}", images, seed=seed, progress=False)
        write_vqa_shards(tmp_path / f"src_{split}", tmp_path / split, split, progress=False)
        build_index(tmp_path / split, progress=False)
        assets[split] = str(tmp_path / split)
    assets["sft"] = assets["train"]
    (in_training,) = run_world(train_tiny_sft_and_evaluate, 1, args=(
        assets, str(tmp_path / "ckpt"), 2, str(tmp_path / "in_training.json")))
    # eval.results_json: the run's own record of its evaluation at the end
    assert json.loads((tmp_path / "in_training.json").read_text()) == {"end": in_training}

    proc = run_cli("-m", "megatron_finevit.evaluate", "--checkpoint", str(tmp_path / "ckpt"),
                   "--data", assets["eval"], "--task", "vqa", "--json", str(tmp_path / "vqa.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "vqa.json").read_text())
    assert results == in_training  # the checkpoint's weights, evaluated as the trainer does
    assert {"vqa_acc_count", "vqa_acc_color", "vqa_acc_read"} <= set(results)
    assert "held-out VQA (exact match)" in proc.stdout
    assert f"all{int(results['vqa_n']):31d}" in proc.stdout

    # under torchrun every rank is a data-parallel rank evaluating its share: the same results
    dp2 = run_cli("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                  str(free_port()), "-m", "megatron_finevit.evaluate", "--checkpoint",
                  str(tmp_path / "ckpt"), "--data", assets["eval"], "--task", "vqa", "--json",
                  str(tmp_path / "vqa_dp2.json"))
    assert dp2.returncode == 0, dp2.stderr[-3000:]
    assert json.loads((tmp_path / "vqa_dp2.json").read_text()) == in_training

    wrong = run_cli("-m", "megatron_finevit.evaluate", "--checkpoint", str(tmp_path / "ckpt"),
                    "--data", assets["eval"], "--task", "align")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert error_lines(wrong.stderr) == [
        "config error: --task align does not apply to a sft run: give a Stage III (align) "
        "checkpoint or --config"]
