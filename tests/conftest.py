"""Shared test fixtures and helpers: the tiny random-weight teacher, the generated sample scenes (VOC and COCO
layouts, zeroseg.evaluation.samples), stores, tiny training runs and an evaluation data root built from them."""

import atexit
import contextlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from zeroseg.evaluation.samples import sample_photos, write_samples

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
TINY_TEACHER = FIXTURES / "zs-tiny-clip.json"


def _sample_data() -> Path:
    """The sample scenes, written once per test session into a folder removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="zeroseg-samples-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_samples(root)


SAMPLES = _sample_data()  # a --data-root with VOCdevkit/ and coco/ (COCO-Object maps not yet prepared)
VOC_ROOT = SAMPLES / "VOCdevkit" / "VOC2012"
COCO_ROOT = SAMPLES / "coco"
COCO_INSTANCES = COCO_ROOT / "annotations" / "instances_samples2017.json"
PHOTOS = sample_photos(SAMPLES)
STORE_CHUNK = 2  # images per chunk of the stores make_store builds
REPO = Path(__file__).parent.parent
TINY_RUN = (
    "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--workers", "0", "--no-progress",
    "--set", "optim.lr=1e-3", "--set", "schedule.warmup_steps=1", "--set", "run.log_every=1",
)  # fmt: skip


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model runs fastest on one thread (and two threads on two busy cores can be 20x slower); a module
    that trains asks for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root),
                    str(REPO)], check=True, capture_output=True)  # fmt: skip
    [built] = root.glob("zeroseg-*.whl")
    return built


@pytest.fixture(scope="session")
def wheel_bin(wheel, tmp_path_factory) -> Path:
    """The bin folder of a fresh venv holding zeroseg from the wheel, as `pip install` gives a user: console
    scripts, package data, nothing of the repository. Its dependencies are this environment's (its site-packages
    is appended by a .pth line, whose own .pth files, this checkout's editable install among them, Python does not
    run), so no package index is needed."""
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = venv.glob("lib/python*/site-packages")
    (site / "zz-dependencies.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)  # fmt: skip
    found = subprocess.run([venv / "bin" / "python", "-c", "import zeroseg; print(zeroseg.__file__)"], cwd=root,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(found.stdout.strip()).is_relative_to(site), found.stdout
    return venv / "bin"


@pytest.fixture
def photos(tmp_path) -> Path:
    """The 10 sample photos in an ImageNet-like layout: photos/<class>/<name>.jpg."""
    root = tmp_path / "photos"
    for path in PHOTOS:
        target = root / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return root


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the console scripts as a real subprocess (exit code and output as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"},
    )


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: the only stream a zs-cache bar draws on (runtime.bar_disabled)."""

    def isatty(self) -> bool:
        return True


def final_bar_line(text: str) -> str:
    """The last state a tqdm bar drew (it redraws the line after each carriage return)."""
    return text.rstrip().split("\r")[-1]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def invoke(main, *args: str) -> CliResult:
    """Run a console-script entry point in this process (fast; same exit code and output as a subprocess)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["zs", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


def make_store(root, count: int = len(PHOTOS), image_size: int = 32, store_crops: bool = False, decode: str = "full"):
    """A store of the first `count` sample photos (more than there are: copies under other names) with the tiny
    teacher: chunks of 2, shards of 4."""
    from zeroseg.pipeline.build import run_build
    from zeroseg.pipeline.options import BuildOptions

    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(count):
        path = PHOTOS[i % len(PHOTOS)]
        shutil.copy(path, photos / (path.name if i < len(PHOTOS) else f"copy{i}-{path.name}"))
    opts = BuildOptions(
        source=str(photos), store=str(root / "store"), teacher=str(TINY_TEACHER), pretrained="none", device="cpu",
        shard_size=4, chunk_size=STORE_CHUNK, batch_size=10, image_size=image_size, progress=False,
        store_crops=store_crops, decode=decode,
    )  # fmt: skip
    run_build(opts, log=lambda line: None)
    return root / "store"


def train(store, run_dir, *args) -> CliResult:
    """`zs-train run` of the tiny model on `store` (TINY_RUN settings, then `args`) into `run_dir`."""
    from zeroseg.trainer.cli import main as zs_train

    return invoke(zs_train, "run", "--store", store, "--run-dir", run_dir, *TINY_RUN, *args)


def flip_byte(path: Path, position: int | None = None) -> None:
    """Flip one bit of a file (its middle byte, or the one at `position`)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if position is None else position] ^= 0x10
    path.write_bytes(bytes(data))


def read_every_batch(store_path: Path) -> list:
    """Every training batch of a store, batches of 2 in one window of 2."""
    from zeroseg.pipeline.store_reader import StoreReader
    from zeroseg.trainer.data import StoreBatches
    from zeroseg.trainer.sampling import BatchPlan

    samples = StoreReader.open(store_path)
    dataset = StoreBatches(samples, BatchPlan(batch=2, accum=1, world=1, rank=0), window=2, seed=0)
    return [dataset[j] for j in range(len(samples) // 2)]


def rebuild(store_path: Path, **overrides):
    """run_build of a store from its own source with the tiny teacher: (summary, the lines it logged)."""
    from zeroseg.pipeline.build import run_build
    from zeroseg.pipeline.options import BuildOptions
    from zeroseg.pipeline.store import FeatureStore

    meta = FeatureStore.open(store_path).meta
    opts = BuildOptions(
        source=meta.sources["photos"].path, store=str(store_path), teacher=str(TINY_TEACHER),
        pretrained="none", device="cpu", batch_size=10, image_size=32, progress=False, **overrides,
    )  # fmt: skip
    lines = []
    summary = run_build(opts, log=lines.append)
    return summary, lines


@pytest.fixture(scope="module")
def pristine_crops_store(tmp_path_factory) -> Path:
    """10 photos, crops kept: shards of 4 images in chunks of 2 -> 3 shards (4, 4 and 2 rows), 5 chunks per array;
    built once per test module."""
    return make_store(tmp_path_factory.mktemp("pristine"), store_crops=True)


@pytest.fixture
def crops_store(pristine_crops_store, tmp_path) -> Path:
    """A fresh copy of pristine_crops_store, for one test to damage, repair or compact."""
    shutil.copytree(pristine_crops_store.parent, tmp_path / "copy")
    return tmp_path / "copy" / "store"


def tiny_checkpoint(root: Path, count: int = 4) -> Path:
    """root/run: 2 optimizer steps (TINY_RUN) of the tiny model on make_store(root, count), one checkpoint."""
    trained = train(make_store(root, count=count), root / "run", "--steps", "2")
    assert trained.returncode == 0, trained.stderr
    return root / "run"


def eval_data_root(root: Path) -> Path:
    """root/data as zs-eval reads it: the VOC samples, and COCO-Object label maps prepared (`zs-eval prepare coco`)
    from the samples' instances JSON."""
    from zeroseg.evaluation.cli import main as zs_eval

    data = root / "data"
    (data / "coco").mkdir(parents=True)
    (data / "VOCdevkit").symlink_to(SAMPLES / "VOCdevkit", target_is_directory=True)
    shutil.copytree(COCO_ROOT / "val2017", data / "coco" / "val2017")
    prepared = invoke(zs_eval, "prepare", "coco", "--instances", COCO_INSTANCES, "--data-root", data, "--no-progress")
    assert prepared.returncode == 0, prepared.stderr
    assert "wrote 6 COCO-Object label maps" in prepared.stdout
    return data


KILLED_WRITER = """
import io, os, signal, sys, torch
from zeroseg.io import atomic_path

class DiesMidway(io.FileIO):  # torch.save's file: SIGKILL once a megabyte is written
    def write(self, data):
        written = super().write(data)
        if self.tell() > 1 << 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return written

with atomic_path(sys.argv[1]) as partial:
    torch.save({"weights": torch.zeros(1 << 20)}, DiesMidway(partial, "w"))
"""


def killed_writer(target: Path) -> Path:
    """The temporary file a process killed with SIGKILL inside torch.save(target) leaves (zeroseg.io.atomic_path)."""
    died = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True)
    assert died.returncode == -9, died.stderr
    (partial,) = target.parent.glob(f".{target.name}.*.partial")
    assert partial.stat().st_size > 1 << 20
    return partial


def dead_pid() -> int:
    """The process id of a process that has exited (the writer of a temporary file left behind)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A real tmpfs at `path` (root only): skipped with a reason where this machine cannot mount."""
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height greyscale pixels but holds only the first rows: decoding it would
    allocate the whole image before failing; refusing it from the header allocates nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(bytes(4 * (width + 1)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
