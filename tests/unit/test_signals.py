"""The stop signal's line says what a second signal of that kind does: a second Ctrl-C quits without saving, a
second SIGTERM or SIGUSR1 changes nothing (a scheduler repeating itself must not lose the save)."""

from __future__ import annotations

import signal

from brain_trainer.runtime import STOP_SIGNALS, StopFlag


def signalled_twice(signum: int, capsys) -> tuple[str, int | None]:
    before = {each: signal.getsignal(each) for each in STOP_SIGNALS}
    stop = StopFlag()
    try:
        signal.raise_signal(signum)
        signal.raise_signal(signum)
    finally:
        stop.close()
        for each, handler in before.items():
            signal.signal(each, handler)
    return capsys.readouterr().out, stop.signum


def test_a_second_sigterm_changes_nothing_and_the_first_line_says_so(capsys):
    out, signum = signalled_twice(signal.SIGTERM, capsys)
    assert signum == signal.SIGTERM
    assert out.strip().splitlines() == [
        "SIGTERM received: stopping at the next step boundary (another SIGTERM changes nothing: the run saves, "
        "then exits)",
        "",
        "SIGTERM received: already stopping at the next step boundary",
    ]
    assert "Ctrl-C" not in out


def test_slurms_sigusr1_says_the_same_of_itself(capsys):
    out, _ = signalled_twice(signal.SIGUSR1, capsys)
    assert out.strip().startswith(
        "SIGUSR1 received: stopping at the next step boundary (another SIGUSR1 changes nothing"
    )
