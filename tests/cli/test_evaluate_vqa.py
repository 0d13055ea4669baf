"""``python -m megatron_finevit.evaluate --task vqa`` as a user runs it: on a checkpoint that is
not an SFT run it exits 2 with one clear line and no traceback; the VQA table's layout."""

from conftest import error_lines, run_cli


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
