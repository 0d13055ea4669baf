#!/usr/bin/env bash
# The CPU quick start (the README's main job): FineViT Stage I (MIM against a tiny DINOv3 teacher),
# Stage II (SigLIP contrastive, initialised from Stage I), Stage III (LLM alignment on region QA
# with a tiny random Qwen3, from Stage II's encoder) and SFT phase I (synthetic VQA conversations,
# from the whole Stage III model) on 2 gloo ranks, with held-out image<->text retrieval before and
# after Stage II, held-out grounding before and after Stage III and held-out VQA before and after
# SFT.
#
#   bash examples/cpu_quickstart.sh [RUN_DIR]      (default runs/quickstart; data is reused)
#
# Fails unless Stage II's retrieval R@1 is at least 5x chance, Stage III's grounding accuracy at
# least 1.5x the mean-box baseline and its region-caption exact match at least 2x the
# most-frequent-answer baseline, and SFT's VQA accuracy at least 1.3x the majority-answer baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Transparent huge pages for glibc's malloc (glibc >= 2.35; ignored elsewhere). Stage III and SFT
# allocate and free tens of MB every micro-batch (logits over Qwen3's 151,936-row vocabulary,
# the tied embedding's gradient); as 4 KiB pages that was a third of the CPU time in page
# faults, and the quick start's Stage III took 8.5 instead of 6.6 min (tools/bench_malloc.py)
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
RUN=${1:-runs/quickstart}
PY=.venv/bin/python
start=$(date +%s)

# 1. data: FineCap-mini synthetic shards (train + held-out eval split), and for Stage III a
#    grounding set (224² scenes, one or two large shapes on a 4x4 grid of 56-px cells, at most
#    one word), indexed. Each split records the arguments it was made with (made_with) and is
#    made again when they change.
grounding="--square-size 224 --shape-scale 0.3 0.6 --max-shapes 2 --max-words 1 --grid-cell 56"
for split in "train 1536 0" "eval 256 1" "align_train 3072 10 $grounding" "align_eval 256 11 $grounding"; do
  set -- $split
  if [ "$(cat "$RUN/data/$1/made_with" 2>/dev/null)" != "$*" ]; then
    rm -rf "$RUN/data/$1"
    $PY tools/make_synthetic_data.py --out "$RUN/data/$1" --num "$2" --seed "$3" "${@:4}"
    $PY tools/build_index.py "$RUN/data/$1"
    echo "$*" > "$RUN/data/$1/made_with"
  fi
done
# 2. the tiny random DINOv3 teacher (the real one cannot be downloaded here) and the tokenizer
[ -f "$RUN/teacher/config.json" ] || $PY tools/make_tiny_teacher.py "$RUN/teacher"
[ -f "$RUN/tokenizer.model" ] || $PY tools/train_caption_tokenizer.py "$RUN/data/train" "$RUN/tokenizer.model"
# 3. the LLM: a tiny random Qwen3 in transformers format (Qwen3-1.7B cannot be downloaded here),
#    converted once to megatron as a user converts the real one
#    (4 layers, width 128: examples/stage3_align_tiny.yaml's llm_overrides)
if ! grep -qs '"hidden_size": 128' "$RUN/qwen3_hf/config.json"; then
  rm -rf "$RUN/qwen3_hf" "$RUN/qwen3_mcore"
  $PY tools/make_tiny_qwen3.py "$RUN/qwen3_hf" --layers 4 --hidden 128
fi
[ -f "$RUN/qwen3_mcore/model_config.json" ] || $PY tools/convert_checkpoint.py hf-to-mcore \
  --model qwen3 --hf-dir "$RUN/qwen3_hf" --mcore-dir "$RUN/qwen3_mcore" >/dev/null
rm -rf "$RUN/stage1" "$RUN/stage2" "$RUN/stage3" "$RUN/sft_phase1" "$RUN"/*_eval.json

paths="stage_config.data.dir=$RUN/data/train"
# 4. Stage I: masked image modelling, DP=2
.venv/bin/torchrun --nproc-per-node 2 -m megatron_finevit.train --config examples/stage1_mim_tiny.yaml \
  $paths stage_config.teacher_dir="$RUN/teacher" stage_config.eval_data_dir="$RUN/data/eval" \
  checkpoint.dir="$RUN/stage1"

# Stages II, III and SFT evaluate on their held-out split before the first step and after the
# last, in the training run itself (eval.at_start / at_end), and record both in
# eval.results_json: the metrics `python -m megatron_finevit.evaluate --json` gives for the same
# weights, without two more processes loading the model per stage.
evals="eval.at_start=true eval.at_end=true"

# 5. Stage II: contrastive, DP=2, from Stage I's weights; retrieval before (Stage I's ViT, fresh
#    heads and text tower) and after
s2="$paths stage_config.tokenizer=$RUN/tokenizer.model stage_config.eval_data_dir=$RUN/data/eval"
.venv/bin/torchrun --nproc-per-node 2 -m megatron_finevit.train --config examples/stage2_contrastive_tiny.yaml \
  $s2 checkpoint.dir="$RUN/stage2" checkpoint.load_dir="$RUN/stage1" $evals \
  eval.results_json="$RUN/stage2_eval.json"

# 6. Stage III (DP=2) from Stage II's encoder, the converted Qwen3 and a fresh projector;
#    grounding and region captions before and after
s3="stage_config.data.dir=$RUN/data/align_train stage_config.eval_data_dir=$RUN/data/align_eval
    stage_config.vit_init_dir=$RUN/stage2 stage_config.llm_init_dir=$RUN/qwen3_mcore"
.venv/bin/torchrun --nproc-per-node 2 -m megatron_finevit.train --config examples/stage3_align_tiny.yaml \
  $s3 checkpoint.dir="$RUN/stage3" $evals eval.results_json="$RUN/stage3_eval.json"

# 7. SFT: synthetic VQA conversations about the grounding set's images (count the shapes, the
#    colour of a named shape, read the word; some text-only), phase I tiny (DP=2) from the whole
#    Stage III model, held-out VQA before and after
for split in "vqa_train align_train train 0" "vqa_eval align_eval eval 1"; do
  set -- $split
  made_with="$* from $(cat "$RUN/data/$2/made_with")"
  if [ "$(cat "$RUN/data/$1/made_with" 2>/dev/null)" != "$made_with" ]; then
    rm -rf "$RUN/data/$1"
    $PY tools/make_synthetic_vqa.py --source "$RUN/data/$2" --out "$RUN/data/$1" --split "$3" \
      --seed "$4" >/dev/null
    echo "$made_with" > "$RUN/data/$1/made_with"
  fi
done
sft="stage_config.data.dir=$RUN/data/vqa_train stage_config.eval_data_dir=$RUN/data/vqa_eval
     checkpoint.load_dir=$RUN/stage3"
.venv/bin/torchrun --nproc-per-node 2 -m megatron_finevit.train --config examples/sft_phase1_tiny.yaml \
  $sft checkpoint.dir="$RUN/sft_phase1" $evals eval.results_json="$RUN/sft_phase1_eval.json"

# 8. the tables
$PY - "$RUN" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
run, seconds = sys.argv[1], int(sys.argv[2])
evaluations = {stage: json.load(open(f"{run}/{stage}_eval.json"))
               for stage in ("stage2", "stage3", "sft_phase1")}
before, after = evaluations["stage2"]["start"], evaluations["stage2"]["end"]
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
before3, after3 = evaluations["stage3"]["start"], evaluations["stage3"]["end"]
print(f"\nheld-out Stage III QA ({int(after3['grounding_n'])} grounding questions, "
      f"{int(after3['region_caption_n'])} region-caption questions):")
print(f"{'':44s}{'before':>8s}{'after':>8s}{'baseline':>10s}")
for label, key, base in (("grounding acc@IoU0.5 (caption -> box)", "grounding_acc",
                          "grounding_baseline"),
                         ("region caption exact match (box -> text)", "region_caption_em",
                          "region_caption_baseline_em")):
    print(f"{label:44s}" + "".join(f"{100 * r[key]:7.1f}%" for r in (before3, after3))
          + f"{100 * after3[base]:9.1f}%")
print("(baselines: the mean ground-truth box; the most frequent answer)")
print(f"align_grounding_acc_before={before3['grounding_acc']:.4f}")
print(f"align_grounding_acc={after3['grounding_acc']:.4f}")
print(f"align_grounding_baseline={after3['grounding_baseline']:.4f}")
print(f"align_region_caption_em={after3['region_caption_em']:.4f}")
print(f"align_region_caption_baseline_em={after3['region_caption_baseline_em']:.4f}")
before4, after4 = evaluations["sft_phase1"]["start"], evaluations["sft_phase1"]["end"]
print(f"\nheld-out VQA after SFT ({int(after4['vqa_n'])} questions, exact match):")
print(f"{'':24s}{'before':>8s}{'after':>8s}{'baseline':>10s}")
for kind in sorted(k[len("vqa_n_"):] for k in after4 if k.startswith("vqa_n_")) + [""]:
    suffix = f"_{kind}" if kind else ""
    label = f"{kind} ({int(after4['vqa_n' + suffix])})" if kind else "all"
    print(f"{label:24s}" + "".join(f"{100 * r['vqa_acc' + suffix]:7.1f}%" for r in (before4, after4))
          + f"{100 * after4['vqa_baseline' + suffix]:9.1f}%")
print("(baseline: the most frequent answer of each kind)")
print(f"sft_vqa_acc_before={before4['vqa_acc']:.4f}")
print(f"sft_vqa_acc={after4['vqa_acc']:.4f}")
print(f"sft_vqa_baseline={after4['vqa_baseline']:.4f}")
print(f"wall time {seconds // 60} min {seconds % 60} s")
if after["i2t_r1"] < 5 / n or after["t2i_r1"] < 5 / n:
    sys.exit("retrieval R@1 is not well above chance: the run did not learn")
if after3["grounding_acc"] < 1.5 * after3["grounding_baseline"]:
    sys.exit("Stage III grounding is not well above the mean box: the LLM does not learn where "
             "things are")
if after3["region_caption_em"] < 2 * after3["region_caption_baseline_em"]:
    sys.exit("Stage III region captions are not well above the most-frequent answer: the LLM "
             "does not read the image")
if after4["vqa_acc"] < 1.3 * after4["vqa_baseline"]:
    sys.exit("SFT's held-out VQA accuracy is not well above the majority answer")
PYEOF
