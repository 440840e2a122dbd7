"""`brain-trainer embed`: the index it writes, re-runs that embed only what changed, another checkpoint
rebuilding, unreadable images, caption files in every layout, and bad inputs as one line with exit 2."""

from __future__ import annotations

import json

from brain_trainer.inference.captions import read_captions


def test_caption_files_in_every_layout(tmp_path):
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\tA dog runs .\na.jpg#1\tA brown dog .\n")
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(
        json.dumps({"images": [{"filename": "b.jpg", "split": "test", "sentences": [{"raw": "Two cats ."}]}]})
    )
    kaggle = tmp_path / "captions.txt"
    kaggle.write_text("image,caption\nc.jpg,A bird , flying .\n")
    plain = tmp_path / "lines.txt"
    plain.write_text("a red circle\n\nthree squares\n")
    assert read_captions(token) == [("A dog runs .", "a.jpg"), ("A brown dog .", "a.jpg")]
    assert read_captions(karpathy) == [("Two cats .", "b.jpg")]
    assert read_captions(kaggle) == [("A bird , flying .", "c.jpg")]
    assert read_captions(plain) == [("a red circle", None), ("three squares", None)]
