"""`zs-cache`: stage one of zeroseg, the teacher feature store."""

import os
from functools import partial

import typer

from zeroseg.errors import UserError
from zeroseg.pipeline.options import DEFAULT_ROWS_PER_PART, DEFAULT_SHARD_SIZE, BuildOptions, CompactOptions
from zeroseg.runtime import DEVICE_HELP, run_cli

app = typer.Typer(
    help="Stage one of zeroseg: run a CLIP teacher over grid views of centre-cropped images and keep the "
    "features in a chunked Zarr store with a Parquet manifest.",
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT = BuildOptions(source="", store="")  # the one source of the build defaults


def parse_grids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--grids takes comma-separated integers like 1,2,3,4, got '{text}'") from None


@app.command()
def build(
    source: str = typer.Argument(
        ..., help="Folder of images (recursive; key = relative path), folder of webdataset .tar shards "
        "(img2dataset), an HDF5 file made by pack-h5, one image file, or a list file (one path per line, or Parquet "
        "with --column)."
    ),
    store: str = typer.Option(..., "--store", help="Store directory; created, resumed or appended to."),
    grids: str = typer.Option(
        ",".join(map(str, DEFAULT.grids)), help="Grids of views per crop: g gives g x g cells (1,2,3,4 = 30 views)."
    ),
    teacher: str = typer.Option(
        DEFAULT.teacher, help="open_clip model name, hf-hub:ORG/REPO (from the Hugging Face cache), local-dir:FOLDER "
        "(open_clip_config.json + weights), or the path of a model-config JSON (stored in the store by content)."
    ),
    pretrained: str | None = typer.Option(
        DEFAULT.pretrained, help="open_clip tag (downloads), a local weights file, or 'none' for random weights "
        "(default: openai; hf-hub:/local-dir: teachers bring their own weights)."
    ),
    quick_gelu: bool | None = typer.Option(
        DEFAULT.quick_gelu, "--quick-gelu/--no-quick-gelu",
        help="The activation the weights were trained with: --quick-gelu for OpenAI's weights, --no-quick-gelu "
        "for LAION/DataComp/... ones. Default: automatic where certain (openai tag, -quickgelu names, OpenAI "
        "TorchScript archives, the hub config); required for a weights file of an architecture OpenAI released.",
    ),
    batch_size: int = typer.Option(
        DEFAULT.batch_size, help="Images per teacher step (each gives one view per grid cell)."
    ),
    device: str = typer.Option(DEFAULT.device, help=DEVICE_HELP),
    shard_size: int | None = typer.Option(
        DEFAULT.shard_size,
        help=f"Images per shard, the unit of atomic commit and resume (default {DEFAULT_SHARD_SIZE}; fixed per store)."
    ),
    chunk_size: int = typer.Option(
        DEFAULT.chunk_size, help="Images per Zarr chunk of a new store; divides the shard size."
    ),
    image_size: int = typer.Option(DEFAULT.image_size, help="Side of the centre crop in pixels."),
    max_error_fraction: float = typer.Option(
        DEFAULT.max_error_fraction, help="Exit non-zero when more than this fraction of the new images cannot be read."
    ),
    decode_threads: int = typer.Option(
        DEFAULT.decode_threads, help="Threads decoding and cropping images (per Dask worker: at most its cores)."
    ),
    source_name: str | None = typer.Option(
        DEFAULT.source_name, help="Name of the source inside the store (default: its stem)."
    ),
    column: str | None = typer.Option(DEFAULT.column, help="Column of paths in a Parquet list file (default 'path')."),
    outside_paths: bool = typer.Option(
        DEFAULT.outside_paths, help="A list file may name absolute paths and paths through '..' (outside its "
        "folder); without this, such a list is refused."
    ),
    compile: bool = typer.Option(
        DEFAULT.compile, help="torch.compile the teacher on CUDA (~20 s once; ignored on CPU); --no-compile: eager."
    ),
    progress: bool = typer.Option(DEFAULT.progress, help="Show a progress bar."),
    store_crops: bool = typer.Option(
        DEFAULT.store_crops,
        help="Also keep the centre crops (uint8) for the trainer; fixed when the store is created, "
        "implied for tar shards."
    ),
    scheduler: str | None = typer.Option(
        DEFAULT.scheduler,
        help="Build on a running Dask cluster, e.g. tcp://HOST:8786 (inputs and store on a shared filesystem)."
    ),
    scheduler_file: str | None = typer.Option(
        DEFAULT.scheduler_file,
        help="Build on the Dask cluster whose scheduler writes this JSON file (dask scheduler --scheduler-file); "
        "waits for the file to appear.",
    ),
    workers: int = typer.Option(
        DEFAULT.workers,
        help="Build on a local Dask cluster of N worker processes (one per GPU, or splitting the CPU cores); "
        "0: in this process."
    ),
    max_pixels: int = typer.Option(
        DEFAULT.max_pixels, help="Images of more pixels (width x height, read from the header before decoding) are "
        "error rows."
    ),
    max_file_mb: float = typer.Option(
        DEFAULT.max_file_mb, help="Files larger than this (MiB) are error rows, never read whole."
    ),
    decode: str | None = typer.Option(
        DEFAULT.decode, help="How a new store decodes its images, fixed at creation (default full): 'reduced' lets "
        "the JPEG decoder scale large photos down by 2, 4 or 8 (short side kept >= --image-size) before the crop, "
        "3x less CPU per image at 1600x1200, 7x at 3000x2000, none below 2x the crop side; its crops differ from a "
        "full decode by 1.3 of 255 on average at those sizes. 'device' decodes JPEGs with torchvision's decode_jpeg "
        "on the teacher's device (nvjpeg on CUDA) and crops them there with torch (other images: Pillow, then the "
        "same crop), so a trainer's CPU only reads the bytes; only that device type can add to or train on the "
        "store. The trainer decodes as the store does."
    ),
    repair: bool = typer.Option(
        DEFAULT.repair, help="First check the store as zs-cache verify does and redo exactly the shards found damaged."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Count the images to cache and print the store's size; compute and write nothing."
    ),
) -> None:
    """Cache teacher features of every image in SOURCE not yet in the store (resumable, incremental)."""
    from zeroseg.pipeline.build import run_build

    opts = BuildOptions(
        source=source, store=store, grids=parse_grids(grids), teacher=teacher, pretrained=pretrained,
        quick_gelu=quick_gelu, batch_size=batch_size, device=device, shard_size=shard_size,
        chunk_size=chunk_size, image_size=image_size, max_error_fraction=max_error_fraction,
        decode_threads=decode_threads, source_name=source_name, column=column, outside_paths=outside_paths,
        compile=compile, progress=progress,
        store_crops=store_crops, scheduler=scheduler, scheduler_file=scheduler_file, workers=workers, repair=repair,
        max_pixels=max_pixels, max_file_mb=max_file_mb, decode=decode,
    )
    if dry_run:
        from zeroseg.pipeline.build import dry_run as plan

        for line in plan(opts):
            typer.echo(line)
        return
    summary = run_build(opts, log=lambda line: typer.echo(line, err=True))
    typer.echo(summary.line())
    if summary.processed and summary.ok == 0:
        typer.echo("error: no image could be read", err=True)
        raise typer.Exit(1)
    if summary.error_fraction > max_error_fraction:
        reasons = ", ".join(f"{n} x {r}" for r, n in summary.error_reasons.most_common(3))
        typer.echo(
            f"error: {100 * summary.error_fraction:.1f}% of images failed ({reasons}), more than "
            f"--max-error-fraction {max_error_fraction}; see the manifest's error column",
            err=True,
        )
        raise typer.Exit(1)


@app.command("pack-h5")
def pack_h5_command(
    folder: str = typer.Argument(..., help="Folder of images to pack (recursive)."),
    out: str = typer.Argument(..., help="HDF5 file to write: datasets /keys (strings) and /images (bytes)."),
) -> None:
    """Pack a folder of images into one HDF5 file, a source for zs-cache build."""
    from zeroseg.pipeline.sources import pack_h5

    count = pack_h5(folder, out)
    typer.echo(f"packed {count} images into {out}")


@app.command()
def inspect(store: str = typer.Argument(..., help="Store directory.")) -> None:
    """Counts, teacher, grids, size on disk and an error summary of a store."""
    from zeroseg.pipeline.check import describe
    from zeroseg.pipeline.store import FeatureStore

    for line in describe(FeatureStore.open(store)):
        typer.echo(line)


@app.command()
def verify(
    store: str = typer.Argument(..., help="Store directory."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Check that manifest and features agree: every ok row exactly once, written, no NaN/Inf."""
    from zeroseg.pipeline.check import verify as verify_store
    from zeroseg.pipeline.store import FeatureStore

    problems, counts = verify_store(FeatureStore.open(store), progress=progress)
    for line in problems[:50]:
        typer.echo(f"problem: {line}", err=True)
    if problems:
        typer.echo(f"store {store} is NOT consistent: {len(problems)} problems", err=True)
        raise typer.Exit(1)
    typer.echo(f"store {store} verified: {counts['ok']} ok rows, {counts['error']} errors, {counts['shards']} shards")
    if counts.get("leftover_parts"):
        typer.echo(
            f"note: {counts['leftover_parts']} manifest parts are left by an interrupted zs-cache compact (zeroseg "
            f"skips them; other Parquet readers see their rows twice): run zs-cache compact {store}", err=True
        )


@app.command("compact")
def compact_command(
    store: str = typer.Argument(..., help="Store directory."),
    rows_per_part: int = typer.Option(
        DEFAULT_ROWS_PER_PART, help="Merge small manifest parts, in shard order, into parts of at most this "
        "many rows (the default makes 10 parts of ImageNet-1k's 1,252)."
    ),
) -> None:
    """Merge the manifest parts into fewer, larger ones (for network filesystems); safe to kill at any moment."""
    opts = CompactOptions(store, rows_per_part)
    from zeroseg.pipeline.compact import compact

    typer.echo(compact(opts, log=lambda line: typer.echo(line, err=True)).line())


def main() -> None:
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    run_cli(partial(app, prog_name="zs-cache"))


if __name__ == "__main__":
    main()
