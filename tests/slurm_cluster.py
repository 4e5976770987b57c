"""A real single-node Slurm for the tests: munged, slurmctld and slurmd on loopback, state in a temp folder.

The node is `localhost` at 127.0.0.1 (slurmd -N localhost), slurmctld and slurmd bind to that address
only (NoInAddrAny, NoCtldInAddrAny) on ports picked free, and munged has its own key and socket, so
nothing here touches a system Slurm or listens beyond loopback. Two GPUs are declared as GRES over two
character devices the cluster makes (copies of /dev/null) so that `--gpus-per-task` parses; the jobs
run on the CPU. Needs root (slurmd launches jobs) and Debian's slurm-wlm and munge packages.

Job credentials live CRED_EXPIRE_S seconds instead of Slurm's 120, and the scheduler looks at all pending jobs
every SCHED_INTERVAL_S seconds, so that a requeued job, which Slurm holds for that lifetime plus a second, starts
again by itself within seconds, the way it does on a real cluster after two minutes.
"""

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
START_TIMEOUT_S = 30
# Slurm's hold of a requeued job (begin time = the first run's end + this + 1 s) keeps the new launch credential
# newer than the one slurmd revoked when the first run was killed. Releasing the job early (StartTime=now) can
# launch it within that same second, which slurmd refuses ("Job N already killed, do not launch batch job"), and
# slurmctld ends the job FAILED 1:0 without running it ("Killing non-startable batch JobId=N: Job credential
# revoked"). A short lifetime keeps that safeguard and the test fast; step launches here take well under a second.
CRED_EXPIRE_S = 10
# Nothing wakes the scheduler when a begin time passes but its full pass (every 60 s by default, backfill every
# 30 s): every 2 s here, so that the requeued job starts about a second after its hold.
SCHED_INTERVAL_S = 2


def missing_reason() -> str | None:
    """Why this machine cannot run the test cluster, or None."""
    absent = [name for name in DAEMONS if shutil.which(name) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge, as .ci/run does"
    if os.geteuid() != 0:
        return "the test Slurm runs slurmd, which launches jobs, as root"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class JobState:
    job_id: str
    state: str  # COMPLETED, FAILED, PENDING, ...
    exit_code: str  # "status:signal"
    restarts: int


class SlurmCluster:
    """Start with start(), stop with stop(); `env` is the environment the client commands need."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="zs-slurm-"))
        self.root.chmod(0o755)  # munged runs as the munge user and must reach its socket
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        self._start_munge()
        self._write_config()
        self._run("slurmctld")
        self._run("slurmd", "-N", "localhost")
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._output("sinfo", "-h", "-n", "localhost", "-o", "%T").strip() != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test Slurm node did not become idle; see {self.root / 'log'}")
            time.sleep(0.5)

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        key_dir, run_dir = self.root / "munge", self.root / "run"
        for folder, mode in ((key_dir, 0o700), (run_dir, 0o755)):
            folder.mkdir(mode=mode)
            os.chown(folder, munge.pw_uid, munge.pw_gid)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        self._run("runuser", "-u", "munge", "--", "munged", f"--key-file={key}", f"--socket={self.munge_socket}",
                  f"--pid-file={run_dir / 'munged.pid'}", f"--log-file={key_dir / 'munged.log'}",
                  f"--seed-file={key_dir / 'munged.seed'}")

    @property
    def munge_socket(self) -> Path:
        return self.root / "run" / "munge.socket"

    def _write_config(self) -> None:
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir()
        for index in range(2):
            os.mknod(self.root / f"gpu{index}", 0o666 | 0o020000, os.makedev(1, 3))  # character devices
        memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        root = self.root
        self.conf.write_text("\n".join([
            "ClusterName=zeroseg-test",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            f"SchedulerParameters=sched_interval={SCHED_INTERVAL_S}",
            "ReturnToService=2",
            "MpiDefault=none",
            "GresTypes=gpu",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mib // 2} "
            "Gres=gpu:2 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))  # fmt: skip
        (root / "gres.conf").write_text(f"Name=gpu File={root}/gpu[0-1]\n")

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons (waiting for them to exit) and remove the state folder."""
        run = self.root / "run"
        pids = [int(p.read_text()) for p in sorted(run.glob("*.pid")) if p.read_text().strip().isdigit()]
        if (run / "slurmctld.pid").exists():
            subprocess.run(["scancel", "--full", "--quiet", "--user", "root"], env=self.env, capture_output=True)
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        for pid in pids:
            self._end(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _end(pid: int) -> None:
        for signal_number, wait_s in ((15, 10), (9, 5)):
            deadline = time.monotonic() + wait_s
            try:
                os.kill(pid, signal_number)
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.2)
            except ProcessLookupError:
                return

    def _run(self, *command: str) -> None:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command[:1])} failed ({result.returncode}): {result.stderr.strip()}")

    def _output(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        return result.stdout if result.returncode == 0 else ""

    # --- jobs --------------------------------------------------------------------------------------

    def submit(self, script: Path, *options: str, env: dict[str, str], cwd: Path) -> str:
        """sbatch with `options` overriding the script's #SBATCH lines and `env` as its parameters."""
        result = subprocess.run(["sbatch", "--parsable", *options, str(script)], env={**self.env, **env}, cwd=cwd,
                                capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise RuntimeError(f"sbatch {script.name} failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> JobState:
        fields = dict(
            item.split("=", 1) for item in self._output("scontrol", "-o", "show", "job", job_id).split() if "=" in item
        )
        return JobState(job_id, fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""),
                        int(fields.get("Restarts", "0")))

    def wait(self, job_id: str, until: set[str], timeout_s: float) -> JobState:
        """Poll the job until its state is in `until` (e.g. {"COMPLETED", "FAILED"})."""
        deadline = time.monotonic() + timeout_s
        while (state := self.job(job_id)).state not in until:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state.state} after {timeout_s:.0f} s")
            time.sleep(0.5)
        return state

    def signal_batch(self, job_id: str, signal_name: str) -> None:
        """What `--signal=B:SIG@margin` does at the margin: the signal to the batch script only."""
        subprocess.run(["scancel", "--batch", f"--signal={signal_name}", job_id], env=self.env, check=True,
                       timeout=60)

    def daemon_log(self, job_id: str) -> str:
        """slurmctld's and slurmd's log lines about the job: why Slurm failed or held it, e.g. without running it."""
        about_job = re.compile(rf"(JobId={job_id}|[Jj]ob {job_id})\b")
        lines = []
        for name in ("slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            if path.is_file():
                lines += [f"{name}: {line}" for line in path.read_text(errors="replace").splitlines()
                          if about_job.search(line)]
        return "\n".join(lines)
