"""The CLI on a machine without s3fs (the optional extra not installed).

python tests/workers/without_s3fs.py TRAIN-FLAGS...
"""

import sys

sys.modules["s3fs"] = None  # import s3fs now raises ImportError, as where it is not installed

from brain_trainer.train import main  # noqa: E402  (after the module table is set up)

sys.exit(main(sys.argv[1:]))
