"""Stopping a study on a signal: Ctrl-C (SIGINT) and what a scheduler sends (SIGTERM, from
Slurm, Kubernetes, systemd) both end it the same clean way.

Ray Tune already stops cleanly on SIGINT: its loop ends, it saves its experiment state one
last time (with the running trials still RUNNING, so a resume continues them from their
checkpoints) and stops the trials; a second SIGINT falls through to Python's default and
forces the exit. SIGTERM would instead kill the driver mid-write. `Interrupt.arm()`, called
once Tune has put its SIGINT handler in place (the recorder's `setup`), routes both signals
to that handler and remembers which one came, so the driver can close the records as
interrupted and exit 130 or 143 like a shell does. The driver's cluster watch stops a study
the same way (`Interrupt.stop`), exit 1.
"""
from __future__ import annotations

import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupt:
    """Why a study stopped before its end, if it did: a signal, or the driver's own watch
    (watch.py: a cluster left with no node that can run a trial)."""

    def __init__(self):
        self.signum: int | None = None
        self.reason: str | None = None
        self.armed = False
        self._tune_stop = None

    @property
    def exit_code(self) -> int | None:
        if self.reason is None:
            return None
        return EXIT_CODES.get(self.signum, 1)

    def arm(self) -> None:
        """Route SIGINT and SIGTERM to Tune's stop (must run in the main thread, once Tune has
        put its SIGINT handler in place)."""
        self._tune_stop = signal.getsignal(signal.SIGINT)

        def on_signal(signum, frame):
            if self.reason is not None or not callable(self._tune_stop):
                raise KeyboardInterrupt   # the second signal: stop at once
            self.signum = signum
            self._stop(signal.Signals(signum).name, frame)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.armed = True

    def stop(self, reason: str) -> None:
        """Stop the study as a first SIGINT would: Tune saves its state and stops the trials."""
        if self.reason is None and callable(self._tune_stop):
            self._stop(reason, None)

    def _stop(self, reason: str, frame) -> None:
        self.reason = reason
        sys.stderr.write(f"vqstudy: {reason}: stopping the trials and saving the study's state "
                         f"(Ctrl-C again to stop at once)\n")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM ends the process
        self._tune_stop(signal.SIGINT, frame)           # and Tune restores the default SIGINT

    def disarm(self) -> None:
        if self.armed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.armed = False
