"""Run by tests/test_runtime.py: Ctrl-C twice to a process holding the stop flag, which names `last_good`
(the first argument, if any) on the way out."""

import signal
import sys

from brain_trainer.runtime import StopFlag

stop = StopFlag()
stop.last_good = sys.argv[1] if len(sys.argv) > 1 else None
signal.raise_signal(signal.SIGINT)
print("first: stop requested" if stop.signum == signal.SIGINT else "first: ignored", flush=True)
signal.raise_signal(signal.SIGINT)
print("still running after the second Ctrl-C", flush=True)
