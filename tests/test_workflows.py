"""The nightly runner end to end on the fixture photos, crash recovery, its lock, and the job specs."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from filelock import FileLock

from tests.conftest import PHOTOS, TINY_TEACHER, VOC_ROOT
from zeroseg.pipeline.check import verify
from zeroseg.pipeline.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
NIGHTLY = REPO / "workflows" / "nightly.py"
NIGHTLY_CRASH = REPO / "tests" / "nightly_crash.py"  # the runner with a crash injected into one step
IMAGE_ROOT = Path("/opt/zeroseg")  # where the Dockerfile puts the repository
SHELL_SCRIPTS = sorted((REPO / "workflows").rglob("*.sbatch")) + [REPO / "demo.sh", REPO / ".ci" / "run"]


@pytest.fixture
def nightly(tmp_path):
    """A nightly config over a folder of 8 fixture photos, tiny teacher and model, VOC fixture eval."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for path in PHOTOS[:8]:
        shutil.copy(path, incoming / path.name)
    config = {
        "work_dir": str(tmp_path / "work"),
        "store": str(tmp_path / "store"),
        "sources": [{"path": str(incoming), "name": "nightly-photos"}],
        "cache_args": ["--teacher", str(TINY_TEACHER), "--pretrained", "none", "--device", "cpu",
                       "--image-size", "32", "--shard-size", "4", "--chunk-size", "2", "--no-progress"],
        "train": {
            "run_dir": str(tmp_path / "run"),
            "steps_per_night": 2,
            "args": ["--preset", "tiny", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                     "--set", "schedule.warmup_steps=1", "--set", "run.checkpoint_every=1"],
        },
        "eval": {"datasets": ["voc"], "data_root": str(VOC_ROOT.parents[1]),
                 "args": ["--device", "cpu", "--short-side", "64", "--max-long-side", "128"]},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def run_nightly(config_path, crash: str | None = None) -> subprocess.CompletedProcess:
    runner = [str(NIGHTLY_CRASH), crash] if crash else [str(NIGHTLY)]
    return subprocess.run([sys.executable, *runner, "--config", str(config_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def reports(config) -> list[Path]:
    return sorted((Path(config["work_dir"]) / "reports").glob("*.json"))


def test_nightly_runs_then_does_nothing_then_caches_exactly_the_new_images(nightly):
    path, config = nightly
    first = run_nightly(path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cache: 8 new images" in first.stdout and "train: step 0 -> 2 on 8 images" in first.stdout
    assert "nightly: done" in first.stdout
    [report] = reports(config)
    document = json.loads(report.read_text())
    assert document["checkpoint"] == "step-00000002" and set(document["datasets"]) == {"voc"}
    assert report.with_suffix(".md").is_file() and report.with_suffix(".png").stat().st_size > 1000

    second = run_nightly(path)
    assert second.returncode == 0, second.stderr
    assert "cache: no new images" in second.stdout and "train: up to date at step 2" in second.stdout
    assert "nightly: nothing new, no work done" in second.stdout and len(reports(config)) == 1

    for source in PHOTOS[8:10]:
        shutil.copy(source, Path(config["sources"][0]["path"]) / source.name)
    third = run_nightly(path)
    assert third.returncode == 0, third.stderr
    assert "cache: 2 new images" in third.stdout and "train: step 2 -> 4 on 10 images" in third.stdout
    latest = json.loads(reports(config)[-1].read_text())
    assert latest["checkpoint"] == "step-00000004" and latest["previous"]["checkpoint"] == "step-00000002"
    assert "| voc |" in reports(config)[-1].with_suffix(".md").read_text()
    assert set(FeatureStore.open(config["store"]).meta.sources) == {"nightly-photos"}


def test_a_crash_in_each_step_is_recovered_by_the_next_run(nightly):
    path, config = nightly
    for step in ("cache", "train", "eval", "report"):
        crashed = run_nightly(path, crash=step)
        assert crashed.returncode == 86 and f"injected crash in {step}" in crashed.stdout, crashed.stderr
    final = run_nightly(path)
    assert final.returncode == 0, final.stdout + final.stderr
    problems, counts = verify(FeatureStore.open(config["store"]), progress=False)
    assert problems == [] and counts["ok"] == 8
    [report] = reports(config)
    assert json.loads(report.read_text())["checkpoint"] == "step-00000002"
    assert run_nightly(path).stdout.strip().endswith("nightly: nothing new, no work done")


def test_a_second_runner_exits_0_while_the_lock_is_held(nightly):
    path, config = nightly
    Path(config["work_dir"]).mkdir()
    with FileLock(str(Path(config["work_dir"]) / "nightly.lock")):
        second = run_nightly(path)
    assert second.returncode == 0
    assert second.stdout.strip().startswith("nightly: already running")
    assert not Path(config["store"]).exists()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def cronjob_spec() -> dict:
    return yaml.safe_load((REPO / "workflows" / "k8s" / "nightly-cronjob.yaml").read_text())


def test_yaml_specs_parse():
    cronjob = cronjob_spec()
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    example = yaml.safe_load((REPO / "workflows" / "nightly.example.yaml").read_text())
    assert {"work_dir", "store", "sources", "train", "eval"} <= set(example)
    assert Path(example["train"]["args"][1]).relative_to(IMAGE_ROOT).as_posix() == "configs/zeroseg-imagenet.yaml"
    for config in (REPO / "configs").glob("*.yaml"):
        assert isinstance(yaml.safe_load(config.read_text()), dict)


def test_cronjob_validates_against_the_kubernetes_schemas():
    cronjob = cronjob_spec()
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(cronjob, version, strict=True)
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pod["containers"][0]["workDir"] = pod["containers"][0].pop("workingDir")  # a misspelt field is caught
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, version, strict=True)


def test_cronjob_runs_the_image_the_dockerfile_builds():
    """Absolute paths that the Dockerfile puts in the image, a pinned tag, GPU requests, /dev/shm in memory."""
    pod = cronjob_spec()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    assert any(line.startswith("FROM pytorch/pytorch:") and "cuda" in line for line in dockerfile)
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile and container["workingDir"] == str(IMAGE_ROOT)
    copied = {line.split()[1] for line in dockerfile if line.startswith("COPY ")}
    assert {"configs", "workflows", "pipeline", "trainer", "evaluation", "src"} <= copied
    assert all((REPO / path).exists() for path in copied)
    assert any(line.startswith("RUN pip install .") for line in dockerfile)
    script = Path(container["command"][1])
    assert container["command"][0] == "python" and script.is_absolute()
    assert (REPO / script.relative_to(IMAGE_ROOT)).is_file() and script.relative_to(IMAGE_ROOT).parts[0] in copied
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"].rsplit(":", 1)[1] == version
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "zeroseg-data"
