"""Evaluation throughput: images/s of zs-eval's segmenter and the share of time spent waiting for data.

Runs `evaluation.evaluate.segment_split` (the zs-eval loop: decode threads ahead of the model, resize to
the short side, whole or slide inference, pixel decision, confusion matrix) over the VOC sample photos,
repeated until there are --images of them, with a randomly initialised student of the given preset
(default: the paper's ViT-B/16) and random unit text embeddings for the 20 VOC classes (the text side
runs once per dataset, outside the loop). Prints the end-to-end rate, the model-only rate, the share of
wall time the loop waited for a decoded image, and the decode cost of one image measured alone.

    python benchmarks/eval_throughput.py --images 8                      # CPU
    python benchmarks/eval_throughput.py --images 200 --mode slide       # GPU
"""

import argparse
import math
import tempfile
import time

import torch

from zeroseg.evaluation.datasets import VOC_CLASS_NAMES, open_dataset
from zeroseg.evaluation.evaluate import segment_split
from zeroseg.evaluation.labeling_rule import LabelingRule
from zeroseg.evaluation.samples import write_samples
from zeroseg.evaluation.segmenter import WindowSegmenter, ZeroSegScorer
from zeroseg.evaluation.windows import Geometry
from zeroseg.process_group import Process
from zeroseg.runtime import resolve_device
from zeroseg.trainer.model import ZeroSeg
from zeroseg.trainer.model_config import model_preset

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--mode", default="whole", choices=("whole", "slide"))
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--workers", type=int, default=2, help="decode threads ahead of the model")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dataset = open_dataset("voc", write_samples(tempfile.mkdtemp(prefix="zeroseg-samples-")), split="trainval")
    dataset.samples = [dataset.samples[i % len(dataset.samples)] for i in range(args.images)]
    torch.manual_seed(0)
    model = ZeroSeg(model_preset(args.preset)).to(device).eval()
    text = torch.nn.functional.normalize(torch.randn(len(VOC_CLASS_NAMES) - 1, model.cfg.teacher_dim), dim=-1)
    rule = LabelingRule(text, math.log(100.0), dataset.bg_threshold)
    geometry = Geometry(mode=args.mode, short_side=args.short_side)
    segmenter = WindowSegmenter(ZeroSegScorer(model), rule, geometry, CLIP_MEAN, CLIP_STD, device)
    process = Process(0, 1, 0, device)

    segmenter.segment(dataset[0][1])  # warm-up
    sync(device)
    waits, segments = [], []
    started = time.perf_counter()
    segment_split(
        dataset, segmenter, process, workers=args.workers, progress=False,
        on_image=lambda wait, seconds: (waits.append(wait), segments.append(seconds)),
    )  # fmt: skip
    sync(device)
    wall = time.perf_counter() - started
    decode_started = time.perf_counter()
    dataset[0]
    decode = time.perf_counter() - decode_started

    print(f"device {device}, preset {args.preset}, mode {args.mode}, short {args.short_side}: {args.images} images")
    print(f"end to end     {args.images / wall:8.2f} images/s  ({wall:.2f} s)")
    print(f"model only     {args.images / sum(segments):8.2f} images/s  (segment() calls, decode excluded)")
    print(f"data wait      {100 * sum(waits) / wall:8.1f} % of wall time ({args.workers} decode threads ahead)")
    print(f"decode alone   {1000 * decode:8.1f} ms per image (read + decode + label map, one image, no overlap)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
