"""Train the multimodal brain on Flickr8k: the same as `brain-trainer train` (see `--help`).

    python train_multimodal_brain_flickr8k.py --demo
    python train_multimodal_brain_flickr8k.py --root_dir data/flickr8k --epochs 100 --resume auto
    torchrun --standalone --nproc_per_node 4 train_multimodal_brain_flickr8k.py --root_dir data/flickr8k --resume auto

Kept for the commands users already have; it needs the `brain_trainer` package beside it or installed.
"""

import sys

from brain_trainer.train import run_program

if __name__ == "__main__":
    sys.exit(run_program(program=("python", "train_multimodal_brain_flickr8k.py")))
