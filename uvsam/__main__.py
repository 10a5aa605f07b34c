"""``python -m uvsam`` and the ``uvsam`` command (:func:`run`).

A signal while the program is still loading its modules (the first second or so, before
:func:`uvsam.cli.main` takes over signals) is one line and the usual exit status too, not a
``KeyboardInterrupt`` traceback: nothing has been read or written by then.
"""

import os
import signal
import sys


def _loading(signum, frame) -> None:
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    os.write(2, f"uvsam: interrupted ({name}); uvsam was starting: nothing was read or written\n".encode())
    os._exit(128 + signum)


def run() -> int:
    """The command line: signals handled from the first instruction, then :func:`uvsam.cli.main`."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _loading)
    from uvsam.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
