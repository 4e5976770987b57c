"""The nightly runner end to end on the fixture photos, crash recovery, its lock, and the job specs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import kubernetes_validate
import numpy as np
import pytest
import yaml
from filelock import FileLock
from PIL import Image

from tests.conftest import PHOTOS, TINY_TEACHER, VOC_ROOT
from zeroseg.pipeline.check import verify
from zeroseg.pipeline.store import FeatureStore
from zeroseg.trainer.config import read_config_file
from zeroseg.workflows import JOB_SPECS
from zeroseg.workflows.nightly import main as run_the_runner

REPO = Path(__file__).resolve().parents[1]
NIGHTLY = ["-m", "zeroseg", "nightly"]  # the runner as the README starts it
NIGHTLY_CRASH = REPO / "tests" / "nightly_crash.py"  # the runner with a crash injected into one step
IMAGE_ROOT = Path("/opt/zeroseg")  # where the Dockerfile puts the repository
SHELL_SCRIPTS = sorted((REPO / "workflows").rglob("*.sbatch")) + [REPO / "demo.sh", REPO / ".ci" / "run"]


@pytest.fixture
def nightly(tmp_path, wheel_bin):
    """A nightly config over a folder of 8 sample photos, tiny teacher and model, VOC sample eval; its path, and the
    Python of zeroseg installed from the wheel, which runs the runner and the stages it starts."""
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
    return path, config, wheel_bin / "python"


def run_nightly(python: Path, config_path, crash: str | None = None) -> subprocess.CompletedProcess:
    runner = [str(NIGHTLY_CRASH), crash] if crash else NIGHTLY
    return subprocess.run([str(python), *runner, "--config", str(config_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def reports(config) -> list[Path]:
    return sorted((Path(config["work_dir"]) / "reports").glob("*.json"))


def night_records(config) -> list[str]:
    return [path.read_text() for path in sorted((Path(config["work_dir"]) / "nights").glob("*.md"))]


TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d ")
C0 = (31, 119, 180)  # matplotlib's first line colour


def drawn_pixels(png: Path, box: tuple[int, int, int, int]) -> int:
    """Pixels of the first line colour inside `box` (left, top, right, bottom, in fractions of the image)."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)  # (height, width, 3)
    height, width, _ = pixels.shape
    crop = pixels[int(box[1] * height):int(box[3] * height), int(box[0] * width):int(box[2] * width)]
    return int((np.abs(crop - np.array(C0)) < 40).all(axis=-1).sum())


def test_nightly_runs_then_does_nothing_then_caches_exactly_the_new_images(nightly):
    path, config, python = nightly
    first = run_nightly(python, path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cache: 8 new images" in first.stdout and "train: step 0 -> 2 on 8 images" in first.stdout
    assert "nightly: done (exit 0)" in first.stdout
    assert f"cache: {python} -m zeroseg.pipeline.cli build" in first.stdout  # the stages of the wheel's venv
    lines = first.stdout.splitlines()
    assert all(TIMESTAMP.match(line) for line in lines), first.stdout
    assert "==== zeroseg nightly, pid" in lines[0]
    [report] = reports(config)
    document = json.loads(report.read_text())
    assert document["checkpoint"] == "step-00000002" and set(document["datasets"]) == {"voc"}
    assert report.with_suffix(".md").is_file()
    # One metrics line so far (log_every 20 > 2 steps): the learning-rate panel shows its point.
    assert len((Path(config["train"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()) == 1
    assert drawn_pixels(report.with_suffix(".png"), (0.55, 0.1, 0.95, 0.45)) > 10
    [record] = night_records(config)
    assert record.startswith("# zeroseg night ") and record.splitlines()[0].endswith(": done (exit 0)")
    assert "- cache: 8 new images" in record and "- train: step 0 -> 2 on 8 images" in record
    assert f"- report: {report.with_suffix('.md')}" in record and "What failed" not in record

    second = run_nightly(python, path)
    assert second.returncode == 0, second.stderr
    assert "cache: no new images" in second.stdout and "train: up to date at step 2" in second.stdout
    assert "nightly: nothing new, no work done (exit 0)" in second.stdout and len(reports(config)) == 1
    assert len(night_records(config)) == 2 and "- train: up to date at step 2" in night_records(config)[1]

    for source in PHOTOS[8:10]:
        shutil.copy(source, Path(config["sources"][0]["path"]) / source.name)
    third = run_nightly(python, path)
    assert third.returncode == 0, third.stderr
    assert "cache: 2 new images" in third.stdout and "train: step 2 -> 4 on 10 images" in third.stdout
    latest = json.loads(reports(config)[-1].read_text())
    assert latest["checkpoint"] == "step-00000004" and latest["previous"]["checkpoint"] == "step-00000002"
    assert "| voc |" in reports(config)[-1].with_suffix(".md").read_text()
    assert set(FeatureStore.open(config["store"]).meta.sources) == {"nightly-photos"}


def test_a_crash_in_each_step_is_recovered_by_the_next_run_on_every_image_cached_so_far(nightly):
    """A crash in each step, in turn; after the training crash 2 images come: the killed night's target covered 8,
    so the next night trains a new stretch on all 10; then every step resumes and a quiet night does nothing."""
    path, config, python = nightly
    for step in ("cache", "train", "eval", "report"):
        crashed = run_nightly(python, path, crash=step)
        assert crashed.returncode == 86 and f"injected crash in {step}" in crashed.stdout, crashed.stderr
        if step == "train":
            for source in PHOTOS[8:10]:
                shutil.copy(source, Path(config["sources"][0]["path"]) / source.name)
        if step == "eval":
            [(start, target)] = re.findall(r"train: step (\d+) -> (\d+) on 10 images", crashed.stdout)
            assert 1 <= int(start) and int(target) == int(start) + config["train"]["steps_per_night"]
    final = run_nightly(python, path)
    assert final.returncode == 0, final.stdout + final.stderr
    problems, counts = verify(FeatureStore.open(config["store"]), progress=False)
    assert problems == [] and counts["ok"] == 10
    [report] = reports(config)
    assert json.loads(report.read_text())["checkpoint"] == f"step-{int(target):08d}"
    assert json.loads((Path(config["work_dir"]) / "state.json").read_text())["trained_rows"] == 10
    quiet = run_nightly(python, path)
    assert "train: up to date" in quiet.stdout
    assert "nightly: nothing new, no work done (exit 0)" in quiet.stdout.splitlines()[-1]
    records = night_records(config)
    assert len(records) == 6 and all("no end recorded (still running, or killed)" in r for r in records[:4])


def test_a_failed_night_leaves_a_record_of_what_failed_and_how_to_see_why(nightly):
    path, config, python = nightly
    config["eval"]["data_root"] = str(Path(config["work_dir"]).parent / "no-such-eval-data")
    path.write_text(yaml.safe_dump(config))
    failed = run_nightly(python, path)
    assert failed.returncode == 1 and "nightly: failed in eval, which exited 2 (exit 1)" in failed.stdout, failed.stdout
    [record] = night_records(config)
    assert record.splitlines()[0].endswith(": failed in eval, which exited 2 (exit 1)")
    assert "- train: step 0 -> 2 on 8 images" in record and "## What failed" in record
    assert "`eval` exited 2: `" in record and "no-such-eval-data" in record.split("The end of its output:")[1]
    [log] = re.findall(r"To see why: `less (\S+-eval\.log)`", record)
    assert "no-such-eval-data" in Path(log).read_text()


def long_training(config_path: Path, config: dict) -> None:
    """A night whose training runs for minutes, logging every step and checkpointing only when stopped."""
    config["train"]["steps_per_night"] = 5000
    config["train"]["args"] += ["--set", "run.checkpoint_every=100000", "--set", "run.log_every=1"]
    config_path.write_text(yaml.safe_dump(config))


def wait_for_training(config: dict, process: subprocess.Popen) -> int:
    """The pid of the night's zs-train once it has logged a step."""
    metrics = Path(config["train"]["run_dir"]) / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text()):
        assert process.poll() is None and time.time() < deadline, "the night did not start training"
        time.sleep(0.1)
    return int(trainer_pids(config)[0])


def trainer_pids(config: dict) -> list[str]:
    found = subprocess.run(["pgrep", "-f", "--", f"--run-dir {config['train']['run_dir']}"], capture_output=True,
                           text=True)
    return found.stdout.split()


def test_a_killed_runner_stops_its_stage_and_no_night_starts_while_the_stage_lives(nightly):
    config_path, config, python = nightly
    long_training(config_path, config)
    runner = subprocess.Popen([str(python), *NIGHTLY, "--config", str(config_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    trainer = wait_for_training(config, runner)
    os.kill(trainer, signal.SIGSTOP)  # holds the stage alive while the runner dies and the next night starts
    runner.kill()
    runner.communicate(timeout=60)
    next_night = run_nightly(python, config_path)
    assert next_night.returncode == 0 and "nightly: already running" in next_night.stdout, next_night.stdout
    os.kill(trainer, signal.SIGCONT)  # the parent-death SIGTERM it got waits for this
    deadline = time.time() + 120
    while trainer_pids(config):
        assert time.time() < deadline, "zs-train kept running after its runner was killed"
        time.sleep(0.2)
    [checkpoint] = (Path(config["train"]["run_dir"]) / "checkpoints").glob("step-*.pt")  # stopped cleanly
    assert int(checkpoint.stem.split("-")[1]) >= 1
    [record] = night_records(config)
    assert "no end recorded" in record.splitlines()[0] and "- train: step 0 -> 5000 on 8 images" in record
    # Free once the stage has exited (its command line goes a moment before its files close).
    FileLock(str(Path(config["work_dir"]) / "nightly.lock")).acquire(timeout=60)


def test_sigterm_to_the_runner_as_pid_1_between_stages_ends_the_night(nightly):
    """As in a container: the runner is PID 1 of its own PID namespace, where unhandled signals are ignored."""
    config_path, config, python = nightly
    command = ["unshare", "--pid", "--fork", "--kill-child", str(python), str(NIGHTLY_CRASH),
               "hold-before-train", "--config", str(config_path)]
    if subprocess.run([*command[:4], "true"], capture_output=True).returncode:
        pytest.skip("unshare --pid needs root or user namespaces")
    wrapper = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in wrapper.stdout:
        if "holding before train" in line:
            break
    assert line.strip().endswith("holding before train (pid 1)"), line
    [runner] = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
    os.kill(int(runner), signal.SIGTERM)  # from outside its namespace, as the container runtime sends it
    out, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 143, out + err
    assert "nightly: stopped by SIGTERM (exit 143)" in out
    [record] = night_records(config)
    assert "stopped by SIGTERM (exit 143)" in record.splitlines()[0] and "- cache: 8 new images" in record
    assert not (Path(config["train"]["run_dir"])).exists()


def test_a_second_runner_exits_0_while_the_lock_is_held(nightly):
    path, config, python = nightly
    Path(config["work_dir"]).mkdir()
    with FileLock(str(Path(config["work_dir"]) / "nightly.lock")):
        second = run_nightly(python, path)
    assert second.returncode == 0
    assert "nightly: already running" in second.stdout
    assert not Path(config["store"]).exists()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def cronjob_spec() -> dict:
    return yaml.safe_load((REPO / "workflows" / "k8s" / "nightly-cronjob.yaml").read_text())


def test_yaml_specs_parse_and_name_a_shipped_config():
    cronjob = cronjob_spec()
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    example = yaml.safe_load((REPO / "workflows" / "nightly.example.yaml").read_text())
    assert {"work_dir", "store", "sources", "train", "eval"} <= set(example)
    assert example["train"]["args"] == ["--config", "zeroseg-imagenet"]
    assert read_config_file("zeroseg-imagenet")["model"]  # the name resolves to the shipped config
    for config in (REPO / "configs").glob("*.yaml"):
        assert isinstance(yaml.safe_load(config.read_text()), dict)


def test_jobs_writes_every_shipped_spec_into_a_folder_and_never_over_a_file(tmp_path):
    shipped = {path.relative_to(REPO / "workflows").as_posix() for path in (REPO / "workflows").rglob("*")
               if path.suffix in (".sbatch", ".yaml")}
    assert set(JOB_SPECS) == shipped
    done = subprocess.run([sys.executable, "-m", "zeroseg", "jobs", str(tmp_path / "jobs")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in JOB_SPECS:
        assert (tmp_path / "jobs" / name).read_bytes() == (REPO / "workflows" / name).read_bytes()
    (tmp_path / "jobs" / "slurm" / "train.sbatch").write_text("# edited\n")
    again = subprocess.run([sys.executable, "-m", "zeroseg", "jobs", str(tmp_path / "jobs")], capture_output=True,
                           text=True)
    assert again.returncode == 2 and again.stderr.startswith(f"error: {tmp_path / 'jobs' / JOB_SPECS[0]} exists")
    assert (tmp_path / "jobs" / "slurm" / "train.sbatch").read_text() == "# edited\n"


def test_the_runner_refuses_a_bad_config_in_one_line(tmp_path, capsys, monkeypatch):
    for text, expected in (("work_dir: [", "cannot read the nightly config"), ("- a list", "not a nightly config"),
                           ("work_dir: /x", "missing key(s) sources, store, train, eval")):
        (tmp_path / "nightly.yaml").write_text(text)
        monkeypatch.setattr(sys, "argv", ["nightly", "--config", str(tmp_path / "nightly.yaml")])
        with pytest.raises(SystemExit) as stopped:
            run_the_runner()
        stderr = capsys.readouterr().err
        assert stopped.value.code == 2 and expected in stderr and len(stderr.splitlines()) == 1, stderr


def test_sigterm_to_the_runner_reaches_zs_train_which_checkpoints_before_the_runner_exits(nightly):
    config_path, config, python = nightly
    config["train"]["steps_per_night"] = 5000
    config["train"]["args"] += ["--set", "run.checkpoint_every=100000", "--set", "run.log_every=1"]
    config_path.write_text(yaml.safe_dump(config))
    runner = subprocess.Popen([str(python), *NIGHTLY, "--config", str(config_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = Path(config["train"]["run_dir"]) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or not metrics.read_text()):
        time.sleep(0.1)
    runner.send_signal(signal.SIGTERM)  # to the runner only, as `kill PID` would
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 143, err[-2000:]
    assert "nightly: SIGTERM: passing SIGTERM on to the stage, then ending the night" in out
    assert "nightly: train exited 143; the next night continues" in out and "stopped by SIGTERM (exit 143)" in out
    [record] = night_records(config)
    assert "stopped by SIGTERM (exit 143)" in record.splitlines()[0] and "-train.log`" in record
    [checkpoint] = sorted((Path(config["train"]["run_dir"]) / "checkpoints").glob("step-*.pt"))
    assert int(checkpoint.stem.split("-")[1]) >= 1
    trainers = subprocess.run(["pgrep", "-f", "--", f"--run-dir {config['train']['run_dir']}"], capture_output=True)
    assert trainers.returncode == 1 and trainers.stdout == b""  # no orphan left training


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
    assert container["command"][:4] == ["python", "-m", "zeroseg", "nightly"]  # the installed runner
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"].rsplit(":", 1)[1] == version
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "zeroseg-data"
    [uid] = re.findall(r"^RUN useradd .*--uid (\d+)", "\n".join(dockerfile), re.MULTILINE)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(uid)


def test_cronjob_ends_a_hung_night_and_lets_zs_train_checkpoint_on_gpu_nodes():
    cronjob = cronjob_spec()
    job = cronjob["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert cronjob["spec"]["timeZone"] == "Etc/UTC"
    period_s = 24 * 3600  # "0 2 * * *": nightly
    assert cronjob["spec"]["schedule"] == "0 2 * * *" and 0 < job["activeDeadlineSeconds"] < period_s
    train_window_s = int(re.search(r"SHUTDOWN_TIMEOUT:-(\d+)", (REPO / "workflows/slurm/train.sbatch").read_text())[1])
    assert pod["terminationGracePeriodSeconds"] > train_window_s
    assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def replay_build(context: Path) -> list[tuple[str, list[str]]]:
    """The Dockerfile's COPY instructions replayed in order into `context` (its WORKDIR), honouring .dockerignore;
    each RUN with the files the context holds when it runs."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()]

    def ignored(relative: str) -> bool:
        return any(fnmatch(relative, pattern) or pattern.startswith("**/") and fnmatch(Path(relative).name, pattern[3:])
                   for pattern in patterns)

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [name for name in names if ignored((Path(folder) / name).relative_to(REPO).as_posix())]

    context.mkdir()
    runs = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY":
            *sources, target = arguments.split()
            for source in sources:
                assert not ignored(source), f"COPY {source}: .dockerignore leaves it out of the build context"
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, context / target, ignore=ignore, dirs_exist_ok=True)
                else:
                    shutil.copy(REPO / source, context / target)
        elif instruction == "RUN":
            files = sorted(path.relative_to(context).as_posix() for path in context.rglob("*") if path.is_file())
            runs.append((arguments, files))
    return runs


def test_dockerfile_replayed_step_by_step_installs_the_package_with_dependencies_in_their_own_layer(tmp_path):
    """No image can be built here: the build context is replayed instruction by instruction, and the steps that
    need only that context (the dependency list, the package build) run for real."""
    context = tmp_path / "context"
    runs = replay_build(context)
    [(dependencies, present)] = [(run, files) for run, files in runs if "pip install -r" in run]
    [(install, _)] = [(run, files) for run, files in runs if "pip install --no-deps ." in run]
    assert present == ["pyproject.toml"]  # the layer is rebuilt only when pyproject.toml changes, not with the code
    assert [run for run, _ in runs].index(install) > [run for run, _ in runs].index(dependencies)
    listing = dependencies.split(" && ")[0]
    subprocess.run(["bash", "-c", listing], cwd=context, check=True)
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert (context / "requirements.txt").read_text().splitlines() == required
    (context / "requirements.txt").unlink()

    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                            str(wheels), "."], cwd=context, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = wheels.glob("zeroseg-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        assert {"zeroseg/configs/zeroseg-imagenet.yaml", "zeroseg/trainer/cli.py"} <= set(archive.namelist())
        archive.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    found = subprocess.run([sys.executable, "-c", "import zeroseg.configs; print(zeroseg.configs.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(found.stdout.strip()).is_relative_to(site)
    assert subprocess.run([sys.executable, "-m", "zeroseg", "--help"], env=env, cwd=tmp_path).returncode == 0

    instructions = [instruction for instruction, _ in dockerfile_instructions()]
    users = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert instructions.index("USER") > max(i for i, instruction in enumerate(instructions) if instruction == "RUN")
