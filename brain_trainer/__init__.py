"""brain-trainer: train a multimodal image-text "brain" contrastively on Flickr8k, with a resume you can trust.

The command is `brain-trainer` (or `python -m brain_trainer`); see `brain_trainer.cli`.
"""
__version__ = "0.4.0"
