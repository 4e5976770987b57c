"""`python -m zeroseg COMMAND ...`: the four commands behind one entry (cache, train, eval, segment)."""

import importlib
import sys

COMMANDS = {
    "cache": "zeroseg.pipeline.cli",
    "train": "zeroseg.trainer.cli",
    "eval": "zeroseg.evaluation.cli",
    "segment": "zeroseg.evaluation.segment_cli",
}
USAGE = "usage: python -m zeroseg {cache,train,eval,segment} ...  (= zs-cache, zs-train, zs-eval, zs-segment)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"error: give a command; {USAGE}", file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    command = argv[0].removeprefix("zs-")
    if command not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'; {USAGE}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"zs-{command}", *argv[1:]]
    importlib.import_module(COMMANDS[command]).main()


if __name__ == "__main__":
    main()
