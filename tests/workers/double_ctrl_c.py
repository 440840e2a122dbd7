"""Two Ctrl-C in a row under the run's stop flag: the first asks for a stop (and says so), the second quits
at once with status 130, so the last line is never printed.

    python tests/workers/double_ctrl_c.py
"""
import signal

from brain_trainer.runtime import StopFlag

stop = StopFlag()
signal.raise_signal(signal.SIGINT)
print("first: stop requested" if stop.signum == signal.SIGINT else "first: ignored", flush=True)
signal.raise_signal(signal.SIGINT)
print("still running after the second Ctrl-C", flush=True)
