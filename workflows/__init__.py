"""Scheduled batch jobs: the nightly runner (`python -m zeroseg nightly`, zeroseg.workflows.nightly) and the job specs
shipped with the package (Slurm scripts, the Kubernetes CronJob, the nightly config example), which
`python -m zeroseg jobs OUT` writes into a folder to edit and submit."""

from collections.abc import Iterator
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from zeroseg.errors import UserError


def _specs_in(folder: Traversable, prefix: str = "") -> Iterator[str]:
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _specs_in(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith((".sbatch", ".yaml")):
            yield prefix + entry.name


JOB_SPECS = tuple(sorted(_specs_in(files(__name__))))  # the package data: nightly.example.yaml, slurm/, k8s/


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
