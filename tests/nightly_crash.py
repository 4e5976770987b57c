"""Run workflows/nightly.py with a crash injected into one step: `python tests/nightly_crash.py STEP --config ...`.

cache, train, eval: the stage command is started as usual and SIGKILLed once the runner's own `durable()`
check sees that it has committed something (or it ended); report: the runner dies after writing the
Markdown and before the JSON that marks the report done. Either way the runner then exits CRASH_EXIT, as
a night killed at that point would leave things.
"""

import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

CRASH_EXIT = 86
NIGHTLY = Path(__file__).resolve().parents[1] / "workflows" / "nightly.py"


def crash(step: str) -> None:
    print(f"nightly: injected crash in {step}", flush=True)
    sys.exit(CRASH_EXIT)


def main() -> None:
    step, sys.argv = sys.argv[1], [str(NIGHTLY), *sys.argv[2:]]
    nightly = runpy.run_path(str(NIGHTLY), run_name="nightly")
    run_step, write_atomically = nightly["run_step"], nightly["write_atomically"]

    def crashing_run_step(name, command, durable):
        if name != step:
            return run_step(name, command, durable)
        child = subprocess.Popen(command)
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

    main_globals = nightly["main"].__globals__
    main_globals["run_step"], main_globals["write_atomically"] = crashing_run_step, crashing_write
    nightly["main"]()


if __name__ == "__main__":
    main()
