"""The CLI on a slow disk: every checkpoint persist sleeps a second before it writes, so a signal sent during
training finds a persist in flight.

    python tests/workers/slow_persist.py TRAIN-FLAGS...
"""

import sys
import time

from brain_trainer.checkpointing.storage import LocalStorage
from brain_trainer.train import main

real_write = LocalStorage.write


def slow_write(self, name, save, summary=None):
    time.sleep(1.0)  # a slow disk: the persist is in flight whenever the signal comes
    real_write(self, name, save, summary)


LocalStorage.write = slow_write
sys.exit(main(sys.argv[1:], program=("python", "train_multimodal_brain_flickr8k.py")))
