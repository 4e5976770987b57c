#!/usr/bin/env bash
# The zeroseg demo: all three stages on generated sample scenes (VOC and COCO layouts, made by the package)
# with a tiny random-weight CLIP teacher, on the CPU, in a few minutes. The same as `python -m zeroseg demo`.
# Usage: bash demo.sh [OUT_DIR]   (default ./demo-out; run again to start over)
set -euo pipefail
exec python -m zeroseg demo "$@"
