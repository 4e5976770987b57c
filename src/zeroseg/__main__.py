"""`python -m zeroseg COMMAND ...`: the four commands behind one entry (cache, train, eval, segment), and the demo."""

import importlib
import sys
from pathlib import Path

COMMANDS = {
    "cache": "zeroseg.pipeline.cli",
    "train": "zeroseg.trainer.cli",
    "eval": "zeroseg.evaluation.cli",
    "segment": "zeroseg.evaluation.segment_cli",
}
USAGE = (
    "usage: python -m zeroseg {cache,train,eval,segment} ...  (= zs-cache, zs-train, zs-eval, zs-segment)\n"
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
    if argv[0] == "demo":
        _demo(argv[1:])
    command = argv[0].removeprefix("zs-")
    if command not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'; {USAGE}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"zs-{command}", *argv[1:]]
    importlib.import_module(COMMANDS[command]).main()


def _demo(args: list[str]) -> None:
    from zeroseg.demo import run_demo
    from zeroseg.errors import UserError
    from zeroseg.runtime import user_message

    if len(args) > 1 or any(arg.startswith("-") for arg in args):
        print(f"error: demo takes one folder at most; {USAGE.splitlines()[1].strip()}", file=sys.stderr)
        sys.exit(2)
    try:
        run_demo(Path(args[0] if args else "demo-out"))
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
