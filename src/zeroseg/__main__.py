"""`python -m zeroseg COMMAND ...`: the four commands behind one entry (cache, train, eval, segment), the nightly
runner, the job specs and the demo."""

import importlib
import sys
from pathlib import Path

COMMANDS = {
    "cache": "zeroseg.pipeline.cli",
    "train": "zeroseg.trainer.cli",
    "eval": "zeroseg.evaluation.cli",
    "segment": "zeroseg.evaluation.segment_cli",
    "nightly": "zeroseg.workflows.nightly",
}
USAGE = (
    "usage: python -m zeroseg {cache,train,eval,segment} ...  (= zs-cache, zs-train, zs-eval, zs-segment)\n"
    "       python -m zeroseg nightly --config NIGHTLY.yaml   the nightly runner (cache, train, eval, report)\n"
    "       python -m zeroseg jobs [OUT]   write the Slurm, Kubernetes and nightly job specs (OUT: ./jobs)\n"
    "       python -m zeroseg demo [OUT]   every stage on generated sample scenes, on the CPU (OUT: ./demo-out)\n"
    "       python -m zeroseg --version"
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"error: give a command; {USAGE}", file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if argv[0] == "--version":
        from zeroseg import __version__

        print(f"zeroseg {__version__}")
        sys.exit(0)
    if argv[0] in ("demo", "jobs"):
        _folder_command(argv[0], argv[1:])
    command = argv[0].removeprefix("zs-")
    if command not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'; {USAGE}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"zs-{command}", *argv[1:]]
    importlib.import_module(COMMANDS[command]).main()


def _folder_command(command: str, args: list[str]) -> None:
    """demo [OUT] or jobs [OUT]."""
    from zeroseg.errors import UserError
    from zeroseg.runtime import user_message

    usage = next(line.strip() for line in USAGE.splitlines() if f"zeroseg {command} " in line)
    if len(args) > 1 or any(arg.startswith("-") for arg in args):
        print(f"error: {command} takes one folder at most; {usage}", file=sys.stderr)
        sys.exit(2)
    try:
        if command == "demo":
            from zeroseg.demo import run_demo

            run_demo(Path(args[0] if args else "demo-out"))
        else:
            from zeroseg.workflows import write_job_specs

            for path in write_job_specs(Path(args[0] if args else "jobs")):
                print(path)
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
