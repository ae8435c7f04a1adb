#!/usr/bin/env bash
# make demo: all three stages on a generated shapes dataset (~10 minutes on 2 cores).
# Usage: scripts/demo.sh [OUT_DIR]   (run through `make demo`, which sets up .venv)
set -euo pipefail
OUT=${1:-demo_out}
PY=${PY:-.venv/bin/python}
TRAIN=${DEMO_TRAIN:-1000}
VAL=${DEMO_VAL:-100}
EPOCHS=${DEMO_EPOCHS:-12}
SCST_EPOCHS=${DEMO_SCST_EPOCHS:-2}
rm -rf "$OUT"
step() { printf '\n=== %s ===\n' "$*"; }

step "1/6 Generate a captioning dataset: $TRAIN train + $VAL val images of coloured shapes"
$PY -m demo.make_shapes "$OUT/data" --train "$TRAIN" --val "$VAL"

step "2/6 Extract InceptionV3 features with Beam (--weights none: nothing is downloaded)"
for split in train val; do
  $PY -m beam_jobs.extract_features --split "$split" \
    --captions_json "$OUT/data/annotations/captions_$split.json" \
    --images_dir "$OUT/data/$split" --output_dir "$OUT/features" --weights none --vocab_size 100
done

step "3/6 Train Show-Attend-Tell (MirroredStrategy, step checkpoints, TensorBoard logs in $OUT/model/logs), then self-critical epochs on CIDEr-D"
$PY -m model.train --data_dir "$OUT/features" --model_dir "$OUT/model" --preset small \
  --epochs "$EPOCHS" --batch_size 64 --learning_rate 3e-3 --warmup_steps 50 --patience 3 --max_length 16 \
  --scst_epochs "$SCST_EPOCHS"

step "4/6 Evaluate on val with the COCO caption metrics: greedy and beam 3, next to a blind baseline"
$PY -m model.evaluate --model "$OUT/model/export" --data_dir "$OUT/features" --split val \
  --plots 3 > /dev/null
$PY -m model.evaluate --model "$OUT/model/export" --data_dir "$OUT/features" --split val \
  --beam_size 3 --output_dir "$OUT/model/eval/val_beam3" > /dev/null
$PY -m scripts.compare_metrics greedy="$OUT/model/eval/val/metrics.json" \
  "beam 3"="$OUT/model/eval/val_beam3/metrics.json"

step "5/6 Bulk-caption the val folder and a tar.gz of it into Parquet"
(cd "$OUT/data" && tar -czf ../val_images.tar.gz val/*.jpg)  # files only, no directory entries
$PY -m beam_jobs.caption_images --model "$OUT/model/export" \
  --input "$OUT/data/val" --input "$OUT/val_images.tar.gz" \
  --output_dir "$OUT/captions" --attention_dir "$OUT/attention" --attention_plots 4

step "6/6 A few captions next to their references"
$PY -m scripts.show_captions --captions_dir "$OUT/captions" \
  --captions_json "$OUT/data/annotations/captions_val.json" --count 8
echo
echo "Attention plots:"
ls "$OUT"/model/eval/val/*.png "$OUT"/attention/*.png
