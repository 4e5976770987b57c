"""Run zs-cache compact steps on a store and SIGKILL this process just before its Nth change to the store's files
(an os.replace or an os.unlink): `python tests/compact_crash.py STORE N ROWS_PER_PART [ROWS_PER_PART ...]`.

One compact per ROWS_PER_PART, in order. A run that ends before its Nth change prints the number of changes
it made (so a test learns how many kill points there are), and exits 0.
"""

import os
import signal
import sys


def main() -> None:
    from zeroseg.pipeline.compact import compact
    from zeroseg.pipeline.options import CompactOptions

    store, kill_at, steps = sys.argv[1], int(sys.argv[2]), [int(rows) for rows in sys.argv[3:]]
    changes = 0

    def killing(change):
        def changed(*args, **kwargs):
            nonlocal changes
            changes += 1
            if changes == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return change(*args, **kwargs)

        return changed

    os.replace, os.unlink = killing(os.replace), killing(os.unlink)
    for rows in steps:
        compact(CompactOptions(store, rows))
    print(changes)


if __name__ == "__main__":
    main()
