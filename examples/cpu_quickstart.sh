#!/usr/bin/env bash
# The CPU quick start (the README's main job): FineViT Stage I (MIM against a tiny DINOv3 teacher)
# then Stage II (SigLIP contrastive, initialised from Stage I) on 2 gloo ranks, with image<->text
# retrieval on a held-out synthetic split before and after Stage II.
#
#   bash examples/cpu_quickstart.sh [RUN_DIR]      (default runs/quickstart; data is reused)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=${1:-runs/quickstart}
PY=.venv/bin/python
start=$(date +%s)

# 1. data: FineCap-mini synthetic shards (train + held-out eval split), indexed
for split in "train 1536 0" "eval 256 1"; do
  set -- $split
  if [ ! -f "$RUN/data/$1/index.zarr/zarr.json" ]; then
    $PY tools/make_synthetic_data.py --out "$RUN/data/$1" --num "$2" --seed "$3"
    $PY tools/build_index.py "$RUN/data/$1"
  fi
done
# 2. the tiny random DINOv3 teacher (the real one cannot be downloaded here) and the tokenizer
[ -f "$RUN/teacher/config.json" ] || $PY tools/make_tiny_teacher.py "$RUN/teacher"
[ -f "$RUN/tokenizer.model" ] || $PY tools/train_caption_tokenizer.py "$RUN/data/train" "$RUN/tokenizer.model"
rm -rf "$RUN/stage1" "$RUN/stage2"

paths="stage_config.data.dir=$RUN/data/train"
# 3. Stage I: masked image modelling, DP=2
.venv/bin/torchrun --nproc-per-node 2 -m megatron_finevit.train --config examples/stage1_mim_tiny.yaml \
  $paths stage_config.teacher_dir="$RUN/teacher" stage_config.eval_data_dir="$RUN/data/eval" \
  checkpoint.dir="$RUN/stage1"

# 4. retrieval of the model Stage II starts from (Stage I's ViT, fresh heads and text tower)
s2="$paths stage_config.tokenizer=$RUN/tokenizer.model stage_config.eval_data_dir=$RUN/data/eval"
$PY -m megatron_finevit.evaluate --checkpoint "$RUN/stage1" --config examples/stage2_contrastive_tiny.yaml \
  --data "$RUN/data/eval" --json "$RUN/eval_before.json" $s2 >/dev/null

# 5. Stage II: contrastive, DP=2, from Stage I's weights
.venv/bin/torchrun --nproc-per-node 2 -m megatron_finevit.train --config examples/stage2_contrastive_tiny.yaml \
  $s2 checkpoint.dir="$RUN/stage2" checkpoint.load_dir="$RUN/stage1" eval.at_start=false eval.at_end=false

# 6. retrieval after Stage II, and the table
$PY -m megatron_finevit.evaluate --checkpoint "$RUN/stage2" --data "$RUN/data/eval" \
  --json "$RUN/eval_after.json" $s2 >/dev/null
$PY - "$RUN" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
run, seconds = sys.argv[1], int(sys.argv[2])
before, after = (json.load(open(f"{run}/eval_{w}.json")) for w in ("before", "after"))
n = int(after["num_images"])
print(f"\nheld-out retrieval, {n} images / {n} captions (recall, %):")
print(f"{'':26s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}")
for name, key in (("image->text", "i2t"), ("text->image", "t2i")):
    for label, res in (("before Stage II", before), ("after Stage II", after)):
        print(f"{name + ' ' + label:26s}" + "".join(f"{100 * res[f'{key}_r{k}']:8.1f}" for k in (1, 5, 10)))
print(f"{'chance':26s}" + "".join(f"{100 * min(1.0, k / n):8.1f}" for k in (1, 5, 10)))
if "zero_shot_top1" in after:
    print(f"zero-shot colour+shape top-1 ({int(after['zero_shot_images'])} single-shape images): before "
          f"{100 * before.get('zero_shot_top1', 0):.1f}%, after {100 * after['zero_shot_top1']:.1f}%, "
          f"chance {100 * after['zero_shot_chance_top1']:.1f}%")
print(f"wall time {seconds // 60} min {seconds % 60} s")
if after["i2t_r1"] < 5 / n or after["t2i_r1"] < 5 / n:
    sys.exit("retrieval R@1 is not well above chance: the run did not learn")
PYEOF
