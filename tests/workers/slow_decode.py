"""The CLI with a slow JPEG decoder: each decode prints `decoding` and takes 0.3 s, so a test can send a
signal while the first image cache is being built.

    python tests/workers/slow_decode.py TRAIN-FLAGS...
"""

import sys
import time

from brain_trainer.data import images
from brain_trainer.train import main

real_decode = images.decode_image


def slow_decode(*args, **kwargs):
    print("decoding", flush=True)
    time.sleep(0.3)
    return real_decode(*args, **kwargs)


images.decode_image = slow_decode
sys.exit(main(sys.argv[1:], program=("python", "train_multimodal_brain_flickr8k.py")))
