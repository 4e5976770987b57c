"""Run the nightly runner (zeroseg.workflows.nightly) with a crash injected into one step:
`python tests/nightly_crash.py STEP --config ...`.

cache, train, eval: the stage command is started as usual and SIGKILLed once the runner's own `durable()`
check sees that it has committed something (or it ended); report: the runner dies after writing the
Markdown and before the JSON that marks the report done. Either way the runner then exits CRASH_EXIT, as
a night killed at that point would leave things.

hold-before-STEP: the runner prints "holding before STEP (pid N)" and waits up to HOLD_S seconds before that
step starts: a moment between stages at which a test signals it.
"""

import os
import signal
import sys
import time

from zeroseg.workflows import nightly

CRASH_EXIT = 86
HOLD_S = 120


def crash(step: str) -> None:
    print(f"nightly: injected crash in {step}", flush=True)
    sys.exit(CRASH_EXIT)


def main() -> None:
    step, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    run_stage, write_atomically = nightly.Night.run_stage, nightly.write_atomically

    def crashing_run_stage(night, name, command, durable):
        if step == f"hold-before-{name}":
            print(f"nightly: holding before {name} (pid {os.getpid()})", flush=True)
            time.sleep(HOLD_S)
        if name != step:
            return run_stage(night, name, command, durable)
        child = night.start(name, command)
        while child.poll() is None and not durable():
            time.sleep(0.05)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
        crash(step)

    def crashing_write(path, text):
        if step == "report" and path.suffix == ".json" and path.parent.name == "reports":
            crash(step)
        write_atomically(path, text)

    nightly.Night.run_stage = crashing_run_stage
    nightly.write_atomically = crashing_write
    nightly.main()


if __name__ == "__main__":
    main()
