"""Claims FOLDER as a fresh run would (no --resume, no --overwrite): exits 0 when it got it, or prints the
refusal on stderr and exits 2.

    python tests/workers/ckpt_claim_savedir.py FOLDER
"""

import sys

from brain_trainer import checkpointing as ck

try:
    ck.claim_savedir(ck.LocalStorage(sys.argv[1]), resume=None, overwrite=False, unreadable=[]).release()
except ck.CheckpointError as error:
    print(error, file=sys.stderr)
    sys.exit(2)
