"""Scheduled batch jobs: the nightly runner (`python -m zeroseg nightly`, zeroseg.workflows.nightly) and the job specs
shipped with the package (Slurm scripts, the Kubernetes CronJob, the nightly config example), which
`python -m zeroseg jobs OUT` writes into a folder to edit and submit."""

from importlib.resources import files
from pathlib import Path

from zeroseg.errors import UserError

JOB_SPECS = ("nightly.example.yaml", "slurm/cache.sbatch", "slurm/train.sbatch", "slurm/eval.sbatch",
             "k8s/nightly-cronjob.yaml")  # fmt: skip


def write_job_specs(out: Path) -> list[Path]:
    """The job specs as OUT/NAME (JOB_SPECS); a file already there is refused, before anything is written."""
    targets = [out / name for name in JOB_SPECS]
    existing = [target for target in targets if target.exists()]
    if existing:
        raise UserError(f"{existing[0]} exists: remove it or give another folder (nothing was written)")
    for name, target in zip(JOB_SPECS, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files(__name__).joinpath(name).read_bytes())
    return targets
