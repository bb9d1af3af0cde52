"""Stopping on request: Ctrl-C (SIGINT) or SIGTERM (a scheduler's pre-emption) finish the current step, save a
checkpoint, say where, and exit cleanly, instead of losing everything since the last checkpoint."""

from __future__ import annotations

import signal

from lorafit.errors import LorafitError


class Interrupted(LorafitError):
    """The run stopped on a signal after saving a checkpoint; the message says how to continue."""


class StopRequest:
    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they were
                pass

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user means it
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
