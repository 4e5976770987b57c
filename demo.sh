#!/usr/bin/env bash
# The zeroseg demo: all three stages on the bundled sample photos (real PASCAL VOC and COCO images)
# with a tiny random-weight CLIP teacher, on the CPU, in a few minutes.
# Usage: bash demo.sh [OUT_DIR]   (default ./demo-out; run again to start over)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-demo-out}
fixtures=tests/fixtures
teacher=(--teacher zs-tiny-clip --pretrained none)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
rm -rf "$out"
mkdir -p "$out/data/coco"
ln -s "$PWD/$fixtures/VOCdevkit" "$out/data/VOCdevkit"
ln -s "$PWD/$fixtures/coco/val2017" "$out/data/coco/val2017"

echo "== stage one: teacher features of the sample photos"
for photos in "$fixtures/VOCdevkit/VOC2012/JPEGImages" "$fixtures/coco"; do
    zs-cache build "$photos" --store "$out/store" "${teacher[@]}" --image-size 64 --batch-size 8 \
        --shard-size 8 --chunk-size 8 --no-progress
done
zs-cache verify "$out/store" --no-progress

echo "== stage two: a tiny ZeroSeg student"
zs-train run --store "$out/store" --run-dir "$out/run" --preset tiny --steps 100 --batch-size 8 \
    --workers 0 --device cpu --set model.image_size=64 --set optim.lr=1e-3 --set schedule.warmup_steps=10 --set run.checkpoint_every=50 --no-progress
zs-train plot "$out/run"

echo "== evaluation: zero-shot mIoU on the VOC and COCO samples, open-vocabulary overlays"
zs-eval prepare coco --instances "$fixtures/coco/annotations/icevision_samples_annotations.json" \
    --data-root "$out/data" --no-progress
zs-eval voc coco --checkpoint "$out/run" --data-root "$out/data" --out "$out/eval" \
    --device cpu --no-progress
zs-segment "$fixtures/coco/val2017" --checkpoint "$out/run" --vocabulary coco --out "$out/segment" --device cpu

cat <<DONE

demo finished:
  feature store   $out/store
  checkpoint      $out/run/checkpoints (loss curves: $out/run/curves.png)
  eval report     $out/eval/voc.md, $out/eval/coco.md
  overlays        $out/segment
The teacher here has random weights, so the classes it gives are meaningless: this shows the
machinery, not the method. For real results cache with CLIP weights, e.g.
  zs-cache build IMAGES --store STORE --teacher ViT-L-14 --pretrained openai   (or a local weights file)
and train with --config zeroseg-imagenet.
DONE
