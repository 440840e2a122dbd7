"""Stop signals: SIGINT, SIGTERM and SIGUSR1 ask the run to stop at the next step boundary; the program says
what a second signal of the same kind does. Under torchrun the death of the launcher counts as a SIGTERM."""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def first_signal_line(signum: int) -> str:
    """What the program says on the first stop signal, naming what a second one of that kind does: only a
    second Ctrl-C quits at once; a scheduler's SIGTERM or SIGUSR1 repeated changes nothing (the save goes on)."""
    name = signal.Signals(signum).name
    again = (
        "Ctrl-C again to quit without saving"
        if signum == signal.SIGINT
        else f"another {name} changes nothing: the run saves, then exits"
    )
    return f"\n{name} received: stopping at the next step boundary ({again})"


class StopFlag:
    """SIGINT, SIGTERM and SIGUSR1 ask the run to stop at the next step boundary; a second SIGINT exits at once
    (atomic saves mean even that never leaves a half-written checkpoint), saying so. Under torchrun, the death of
    its agent (this process's parent) asks for a stop as SIGTERM does; `poll()` looks."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self.last_good: str | None = None  # where a completed save is (path or URL; set by the program)
        # Under torchrun the parent is its agent: a signal it does not handle (SIGUSR1 without --signals-to-handle)
        # kills it and leaves the workers training with no launcher. Its death counts as a SIGTERM.
        self.parent = os.getppid() if "LOCAL_RANK" in os.environ else None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def quit_line(self) -> str:
        """What a second Ctrl-C says: which checkpoint survives it (saves are atomic renames: the last completed
        one)."""
        if self.last_good is not None and ("://" in self.last_good or os.path.isfile(self.last_good)):
            return (
                f"\nSIGINT again: quitting without saving; {self.last_good} (the last completed save) is intact: "
                f"inspect it with `python -m brain_trainer ckpt inspect {self.last_good}`, "
                "continue with --resume auto\n"
            )
        return "\nSIGINT again: quitting without saving; no checkpoint of this run was completed yet\n"

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            if self.announce:
                os.write(2, self.quit_line().encode())  # not print(): a signal handler may interrupt a print
            os._exit(128 + signum)
        if self.announce:
            later = f"\n{signal.Signals(signum).name} received: already stopping at the next step boundary"
            print(first_signal_line(signum) if self.signum is None else later, flush=True)
        self.signum = self.signum or signum

    def poll(self) -> int | None:
        """The stop signal, if any; a launcher that has died since the start (another parent) is a SIGTERM."""
        if self.signum is None and self.parent is not None and os.getppid() != self.parent:
            self.signum = signal.SIGTERM
            if self.announce:
                print(
                    f"\nThe launcher (process {self.parent}) is gone: stopping at the next step boundary as on SIGTERM",
                    flush=True,
                )
        return self.signum

    def __bool__(self) -> bool:
        return self.poll() is not None

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
