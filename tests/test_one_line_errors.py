"""Failures a user can cause are one line and a non-zero exit, never a traceback (real files, mounts, signals)."""

import json
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest

from tests.conftest import PHOTOS, SAMPLES, TINY_TEACHER, VOC_ROOT, invoke, make_store, tmpfs, train
from zeroseg.evaluation.cli import main as zs_eval
from zeroseg.evaluation.segment_cli import main as zs_segment
from zeroseg.evaluation.text import _read_cache
from zeroseg.pipeline.cli import main as zs_cache

TINY_BUILD = ("--teacher", TINY_TEACHER, "--pretrained", "none", "--device", "cpu", "--image-size", "32",
              "--shard-size", "4", "--chunk-size", "2", "--no-progress")


def one_line(result, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("errors"), count=4)


def test_a_file_where_a_store_or_run_directory_should_be(store, photos, tmp_path):
    (tmp_path / "file").write_text("x")
    built = invoke(zs_cache, "build", photos, "--store", tmp_path / "file", *TINY_BUILD)
    assert one_line(built).endswith("is a file, not a folder: give --store a new or empty folder")
    trained = train(store, tmp_path / "file", "--steps", "2")
    assert one_line(trained) == f"error: run directory '{tmp_path / 'file'}' is a file: choose another --run-dir"


def test_corrupt_store_metadata_and_manifest_parts(store, tmp_path):
    broken = tmp_path / "store"
    shutil.copytree(store, broken)
    (broken / "manifest" / "shard-000000.parquet").write_bytes(b"not parquet at all")
    assert "manifest part" in one_line(invoke(zs_cache, "inspect", broken))
    (broken / "zarr.json").write_text("{ not json")
    damaged = one_line(invoke(zs_cache, "inspect", broken))
    assert damaged == f"error: '{broken / 'zarr.json'}' is damaged (not Zarr JSON metadata)"


@pytest.mark.parametrize("setting", ["model.num_heads=0", "model.patch_size=0", "model.mlp_ratio=-1", "model.depth=-1"])
def test_impossible_model_values_are_refused(store, tmp_path, setting):
    trained = train(store, tmp_path / "run", "--steps", "2", "--set", setting)
    line = one_line(trained)
    assert setting.split("=")[0] in line, line


def test_eval_checks_its_threshold_and_output_before_evaluating(tmp_path):
    labels = VOC_ROOT / "SegmentationClass"
    nan = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--predictions", labels, "--bg-threshold", "nan",
                 "--out", tmp_path / "out")
    assert one_line(nan) == "error: --bg-threshold must be a finite number, got nan"
    with tmpfs(tmp_path / "ro", "size=1m,ro") as readonly:
        refused = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--predictions", labels, "--out", readonly)
        assert one_line(refused) == f"error: --out '{readonly}' is not writable: Read-only file system"


def test_eval_and_segment_options_are_checked_before_any_file_is_read_or_written(tmp_path):
    """ModelOptions checks every model, labeling and geometry flag when zs-eval / zs-segment make it."""
    labels = VOC_ROOT / "SegmentationClass"
    both = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--predictions", labels, "--checkpoint", "run")
    assert one_line(both) == "error: --predictions scores saved label maps; it takes no --checkpoint"
    no_teacher = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--model", "sclip")
    assert one_line(no_teacher).startswith("error: --model sclip needs --teacher")
    no_names = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--model", "sclip", "--teacher", TINY_TEACHER,
                      "--background-names", " , ")
    assert one_line(no_names) == "error: --background-names needs comma-separated names, or 'none'"
    zoom = invoke(zs_segment, PHOTOS[0], "--checkpoint", tmp_path / "absent.pt", "--classes", "cat,dog",
                  "--mode", "zoom", "--out", tmp_path / "out")
    assert one_line(zoom) == "error: --mode 'zoom' is not one of whole, slide"
    batch = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--checkpoint", tmp_path / "absent.pt",
                   "--window-batch", "0", "--out", tmp_path / "out")
    assert one_line(batch) == "error: --window-batch must be positive, got 0"
    assert not (tmp_path / "out").exists()
    nowhere = invoke(zs_eval, "prepare", "coco", "--instances", tmp_path / "instances.json")
    assert one_line(nowhere) == "error: give --data-root (to write where zs-eval looks) or --out"


def test_a_full_disk_during_a_build_and_a_checkpoint_says_so(store, photos, tmp_path):
    with tmpfs(tmp_path / "small", "size=32k") as small:
        built = invoke(zs_cache, "build", photos, "--store", small / "store", *TINY_BUILD, "--store-crops")
        assert built.returncode == 1 and "Traceback" not in built.stderr
        assert built.stderr.strip().splitlines()[-1].startswith("error: no space left on device"), built.stderr
    with tmpfs(tmp_path / "tiny", "size=96k") as tiny:
        trained = train(store, tiny / "run", "--steps", "2")
        assert "no space left on device" in trained.stderr and trained.returncode in (1, 2), trained.stderr
        assert "Traceback" not in trained.stderr


def test_ctrl_c_is_one_line_interrupted_and_exit_130(tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    for copy in range(20):
        for path in PHOTOS:
            shutil.copy(path, photos / f"{copy:02d}-{path.name}")
    command = [sys.executable, "-m", "zeroseg.pipeline.cli", "build", str(photos), "--store", str(tmp_path / "store"),
               *map(str, TINY_BUILD), "--decode-threads", "1"]
    build = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    manifest = tmp_path / "store" / "manifest"
    deadline = time.time() + 120
    while time.time() < deadline and not (manifest.is_dir() and any(manifest.glob("shard-*.parquet"))):
        time.sleep(0.05)
    build.send_signal(signal.SIGINT)
    out, err = build.communicate(timeout=120)
    assert build.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_a_corrupt_text_cache_file_is_rebuilt_with_a_warning(tmp_path):
    path = tmp_path / "entry.pt"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _read_cache(path, ["cat"], ["a photo of a {}."]) is None
    assert any("is damaged" in str(w.message) and "rebuilding it" in str(w.message) for w in caught)


def test_a_features_array_whose_crc32c_codec_was_removed_is_one_line_naming_it(tmp_path):
    """Its chunks still end in a crc32c, which zstd cannot decode (a RuntimeError traceback in verify and train)."""
    store = make_store(tmp_path, count=4)
    metadata = store / "features" / "zarr.json"
    document = json.loads(metadata.read_text())
    document["codecs"] = [codec for codec in document["codecs"] if codec["name"] != "crc32c"]
    metadata.write_text(json.dumps(document))
    refusal = f"error: '{metadata}' lacks the crc32c codec of its chunks (damaged, or written by another zeroseg"
    verified = invoke(zs_cache, "verify", store)
    assert one_line(verified).startswith(refusal)
    assert one_line(train(store, tmp_path / "run", "--steps", "1")).startswith(refusal)
