"""The CLI with an object store whose uploads crawl from the second save on: each save streams in 5 MiB parts
(a multipart upload), and after its first part it prints `uploading slowly` and sleeps, so a test can kill the
run while an upload is half done.

    python tests/workers/slow_upload.py TRAIN-FLAGS...
"""

import sys
import time

from brain_trainer.checkpointing import object_store
from brain_trainer.train import main

object_store.UPLOAD_BLOCK = 5 * 2**20  # S3's smallest part: a tiny model's checkpoint takes several
saves = []


class CrawlingHandle:
    def __init__(self, handle):
        self.handle, self.written = handle, 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > 6 * 2**20 and len(saves) > 1:
            print("uploading slowly", flush=True)
            time.sleep(60)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


real_write = object_store.ObjectStorage.write


def crawling_write(self, name, save, **options):
    saves.append(name)
    real_write(self, name, lambda handle: save(CrawlingHandle(handle)), **options)


object_store.ObjectStorage.write = crawling_write
sys.exit(main(sys.argv[1:], program=("python", "train_multimodal_brain_flickr8k.py")))
