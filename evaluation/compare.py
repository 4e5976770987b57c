"""`zs-eval compare REPORT...`: one mIoU table from zs-eval results JSONs, methods as rows and datasets as
columns, printed and written as Markdown (<out>.md) and a grouped bar chart (<out>.png).

A row is a method as its report's config names it: the model with its teacher (dense CLIP methods), the
checkpoint file (zeroseg) or the predictions folder. Two reports of one method on one dataset are an error.
"""

import json
from collections.abc import Sequence
from pathlib import Path

from zeroseg.errors import UserError
from zeroseg.evaluation.datasets import DATASET_NAMES
from zeroseg.io import atomic_path, write_atomically


def read_report(path: Path) -> dict:
    """A zs-eval results JSON; UserError naming the file when it is unreadable or not one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"report {path} cannot be read: {exc}") from None
    if not isinstance(report, dict) or not {"dataset", "mIoU", "config"} <= report.keys():
        raise UserError(f"report {path} is not a zs-eval results JSON (needs dataset, mIoU and config)")
    return report


def method_label(config: dict, dataset: str = "") -> str:
    """The row name of a report's configuration (of `dataset`: predictions read from DIR/<dataset>/ are DIR's)."""
    model = config.get("model", "?")
    if model == "predictions":
        folder = Path(config.get("predictions", "?"))
        return f"predictions {(folder.parent if folder.name == dataset else folder).name}"
    if model == "zeroseg":
        return f"zeroseg {Path(config.get('checkpoint', '?')).name}"
    teacher = config.get("teacher") or {}
    weights = Path(teacher.get("pretrained") or "none").name  # an open_clip tag, a weights file, or none (random)
    return f"{model} {Path(str(teacher.get('model', '?'))).name} {weights}"


def comparison_table(paths: Sequence[Path]) -> tuple[list[str], list[str], dict[tuple[str, str], float | None]]:
    """(methods in order of first appearance, datasets in zs-eval's order then others, {(method, dataset): mIoU})."""
    cells: dict[tuple[str, str], float | None] = {}
    sources: dict[tuple[str, str], Path] = {}
    methods: list[str] = []
    for path in paths:
        report = read_report(path)
        key = (method_label(report["config"], report["dataset"]), report["dataset"])
        if key in sources:
            raise UserError(f"two reports of {key[0]} on {key[1]}: {sources[key]} and {path}")
        sources[key], cells[key] = path, report["mIoU"]
        if key[0] not in methods:
            methods.append(key[0])
    found = {dataset for _, dataset in cells}
    datasets = [name for name in DATASET_NAMES if name in found] + sorted(found - set(DATASET_NAMES))
    return methods, datasets, cells


def format_table(methods: list[str], datasets: list[str], cells: dict, markdown: bool) -> str:
    """mIoU (%) with two decimals; '-' where a method has no report on a dataset, 'n/a' where mIoU is null."""
    rows = [["method", *datasets]] + [[m, *(_cell(cells, m, d) for d in datasets)] for m in methods]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join([lines[0], "|---|" + "---:|" * len(datasets), *lines[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(value.ljust(w) if i == 0 else value.rjust(w) for i, (value, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def write_comparison(methods: list[str], datasets: list[str], cells: dict, out: Path) -> tuple[Path, Path]:
    """<out>/compare.md (the table) and <out>/compare.png (bars per dataset, one per method), each written
    atomically; the folder is made when missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markdown_path, png_path = out / "compare.md", out / "compare.png"
    write_atomically(markdown_path, "# mIoU (%)\n\n" + format_table(methods, datasets, cells, markdown=True) + "\n")
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(datasets) * max(1, len(methods)) + 2), 4.5))
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        values = [cells.get((method, dataset)) for dataset in datasets]
        positions = [d + (index - (len(methods) - 1) / 2) * width for d in range(len(datasets))]
        bars = axis.bar(positions, [v or 0.0 for v in values], width, label=method)
        axis.bar_label(bars, labels=[_cell(cells, method, dataset) for dataset in datasets], fontsize=7)
    axis.set_xticks(range(len(datasets)), datasets)
    axis.set_ylabel("mIoU (%)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(png_path) as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
    return markdown_path, png_path


def _cell(cells: dict, method: str, dataset: str) -> str:
    if (method, dataset) not in cells:
        return "-"
    value = cells[(method, dataset)]
    return "n/a" if value is None else f"{value:.2f}"
