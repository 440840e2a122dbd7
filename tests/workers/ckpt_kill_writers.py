"""TRIALS times: fork a writer that saves as fast as it can, SIGKILL it at a random instant, then check that
every file it writes loads and is whole (every value equals the file's step), and clear the dead writer's
temporaries. Prints one JSON line: trials, all_loadable_and_whole, what is left in FOLDER.

    python tests/workers/ckpt_kill_writers.py MODE FOLDER TRIALS

MODE `save`: `save_checkpoint` of last in the writer's own thread (16 MB a file);
MODE `background`: a CheckpointWriter persisting last and best in its background thread (4 MB a file).
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from brain_trainer import checkpointing as ck

mode, folder, trials = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
storage, rng, results = ck.LocalStorage(str(folder)), random.Random(0), []
names = [ck.LAST] if mode == "save" else [ck.LAST, ck.BEST]


def write_forever() -> None:
    checkpointer = ck.CheckpointWriter(storage=storage, background=True)
    step = 0
    while True:
        step += 1
        if mode == "save":
            ck.save_checkpoint(
                {"global_step": step, "w": torch.full((4_000_000,), float(step))}, storage.location(ck.LAST)
            )
        else:
            checkpointer.save({"global_step": step, "w": torch.full((1_000_000,), float(step))}, names)


for _ in range(trials):
    child = os.fork()
    if child == 0:
        try:
            write_forever()
        finally:
            os._exit(1)  # never return into the parent's loop
    time.sleep(0.05 + rng.uniform(0.0, 0.3))
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    whole = True
    for name in names:
        checkpoint = ck.read_checkpoint(storage, name)
        whole = whole and bool(torch.all(checkpoint["w"] == checkpoint["global_step"]))
    results.append(whole)
    storage.clean_up()
print(
    json.dumps(
        {
            "trials": len(results),
            "all_loadable_and_whole": all(results),
            "left": sorted(p.name for p in folder.iterdir()),
        }
    )
)
