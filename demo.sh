#!/usr/bin/env bash
# The zeroseg demo: stage one on the bundled sample photos with a tiny random-weight teacher.
# Usage: bash demo.sh [OUT_DIR]   (default ./demo-out)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-demo-out}
export HF_HUB_OFFLINE=1
for photos in tests/fixtures/VOCdevkit/VOC2012/JPEGImages tests/fixtures/coco; do
    zs-cache build "$photos" --store "$out/store" --teacher tests/fixtures/zs-tiny-clip.json \
        --pretrained none --batch-size 8 --shard-size 8 --chunk-size 8
done
zs-cache inspect "$out/store"
zs-cache verify "$out/store" --no-progress
echo "store: $out/store"
echo "note: a random-weight teacher gives meaningless features; use --teacher ViT-L-14 --pretrained openai"
echo "      (or a local weights file) for real ones."
