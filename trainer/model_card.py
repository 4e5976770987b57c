"""The model card of an export (README.md beside model.safetensors and config.json, the file the Hugging Face Hub
shows): method, teacher, data, steps, the zs-eval reports found for the exported checkpoint, and how to load it.
No absolute path goes into it, as into config.json."""

import json
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"


def model_card(document: dict[str, Any], meta: dict[str, Any]) -> str:
    """document: the export's config.json content; meta: load_trained_model's metadata of the exported checkpoint."""
    teacher = document["teacher"]
    weights = teacher["pretrained"] or teacher["weights_file"] or "random weights"
    model = document["model_config"]
    store = meta["store"]
    lines = [
        "---",
        "library_name: zeroseg",
        "pipeline_tag: image-segmentation",
        "tags: [zeroseg, open-vocabulary-segmentation, clip, distillation]",
        "---",
        "",
        f"# ZeroSeg student ({document['architecture']})",
        "",
        "**Method**: ZeroSeg (Chen et al., ICCV 2023): a ViT with a grouping head distilled from a CLIP image "
        "encoder without labels; segments are named by the teacher CLIP's text tower.",
        f"**Teacher**: {teacher['model']} ({weights}).",
        f"**Data**: a zs-cache feature store of {store.get('rows', '?')} rows (store `{Path(store['path']).name}`), "
        f"crops of {model['image_size']} px, grids {store.get('grids', '?')}."
        if "path" in store else "**Data**: a zs-cache feature store.",
        f"**Steps**: {document['step']} optimizer steps (checkpoint `{document['source']}`).",
        f"**Encoder**: patch {model['patch_size']}, width {model['embed_dim']}, depth {model['depth']}, "
        f"{model['num_heads']} heads.",
        "",
        "## Evaluation",
        "",
        *_evaluation_rows(Path(meta["path"])),
        "",
        "## How to load it",
        "",
        "```python",
        "from zeroseg.evaluation.pretrained import Segmenter",
        "",
        'segmenter = Segmenter.from_pretrained("ORG/REPO")  # this folder, from the Hub or a local path',
        'result = segmenter("cat.jpg", classes=["cat", "dog", "grass"])',
        "```",
        "",
        "or `zs-segment IMAGES --checkpoint hf-hub:ORG/REPO --classes cat,dog`. The encoder alone loads into timm as "
        "the zeroseg README shows (config.json: `architecture`, `model_args`, `pretrained_cfg`).",
    ]
    return "\n".join(lines) + "\n"


def _evaluation_rows(checkpoint: Path) -> list[str]:
    """A table of the zs-eval reports in the checkpoint's default results folder (<checkpoint stem>-eval/)."""
    reports = []
    for path in sorted((checkpoint.parent / f"{checkpoint.stem}-eval").glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and {"dataset", "mIoU", "split"} <= report.keys():
            reports.append(report)
    if not reports:
        return ["No zs-eval report was found beside the exported checkpoint."]
    rows = ["| dataset | split | mIoU | mAcc | pixel accuracy |", "|---|---|---:|---:|---:|"]
    for report in reports:
        scores = [report.get(key) for key in ("mIoU", "mAcc", "pixel_accuracy")]
        cells = " | ".join("-" if value is None else f"{value:.2f}" for value in scores)
        rows.append(f"| {report['dataset']} | {report['split']} | {cells} |")
    return rows
