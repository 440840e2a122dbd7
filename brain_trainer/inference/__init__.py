"""Using a trained brain: load it (`load_brain`), embed a folder into an index, search the index, export it.

from brain_trainer import load_brain
brain = load_brain("checkpoints_brain_v2/best_brain_v2.pt")   # or a folder written by `brain-trainer export`
texts = brain.embed_texts(["a red circle on a white background"])          # (1, d), L2-normalised
images = brain.embed_images(["a.jpg", "b.png"])   # paths, PIL images or uint8 tensors; the evaluation's preprocessing
"""

from brain_trainer.inference.load import Brain, InferenceError, load_brain

__all__ = ["Brain", "InferenceError", "load_brain"]
