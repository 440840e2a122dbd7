"""brain-trainer: train a multimodal image-text "brain" contrastively on Flickr8k, with a resume you can trust.

The command is `brain-trainer` (or `python -m brain_trainer`); see `brain_trainer.cli`.
"""

__version__ = "0.4.0"


def __getattr__(name: str):
    """`brain_trainer.load_brain` (see `brain_trainer.inference`), imported on first use: the command starts fast."""
    if name == "load_brain":
        from brain_trainer.inference.load import load_brain

        return load_brain
    raise AttributeError(f"module 'brain_trainer' has no attribute {name!r}")
