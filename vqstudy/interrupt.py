"""Stopping a study on a signal: Ctrl-C (SIGINT) and what a scheduler sends (SIGTERM, from
Slurm, Kubernetes, systemd) both end it the same clean way.

Ray Tune already stops cleanly on SIGINT: its loop ends, it saves its experiment state one
last time (with the running trials still RUNNING, so a resume continues them from their
checkpoints) and stops the trials; a second SIGINT falls through to Python's default and
forces the exit. SIGTERM would instead kill the driver mid-write. `Interrupt.arm()`, called
once Tune has put its SIGINT handler in place (the recorder's `setup`), routes both signals
to that handler and remembers which one came, so the driver can close the records as
interrupted and exit 130 or 143 like a shell does.
"""
from __future__ import annotations

import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupt:
    def __init__(self):
        self.signum: int | None = None
        self.armed = False

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES.get(self.signum) if self.signum else None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def arm(self) -> None:
        """Route SIGINT and SIGTERM to Tune's stop (must run in the main thread)."""
        tune_stop = signal.getsignal(signal.SIGINT)

        def on_signal(signum, frame):
            first = self.signum is None
            self.signum = self.signum or signum
            if first and callable(tune_stop):
                sys.stderr.write(f"vqstudy: {signal.Signals(signum).name}: stopping the trials and saving the "
                                 f"study's state (send it again to stop at once)\n")
                signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM ends the process
                tune_stop(signal.SIGINT, frame)                 # and Tune restores the default SIGINT
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.armed = True

    def disarm(self) -> None:
        if self.armed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.armed = False
