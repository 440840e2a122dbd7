"""`build_model`: the model of a configuration, with every way its encoders can fail to load said as one line
naming the flag. Training (`build.py`) and inference (`inference/load.py`) both make their model here, so using
a trained brain imports nothing of the training stack."""

from __future__ import annotations

import urllib.error

from brain_trainer.brain_model import BrainConfig, BrainModel, UnsupportedEncoder
from brain_trainer.config import ConfigError


def build_model(model_config: BrainConfig, pretrained: bool) -> BrainModel:
    """The model, with every way its encoders can fail to load said as one line naming the flag."""
    try:
        return BrainModel(model_config, pretrained=pretrained)
    except UnsupportedEncoder as error:
        raise ConfigError(str(error)) from None
    except urllib.error.URLError:  # torchvision downloads weights with urllib
        raise ConfigError(
            f"--image_weights {model_config.image_weights}: weights for {model_config.image_encoder} "
            f"could not be downloaded (no network?); give a local weights file or none"
        ) from None
    except (OSError, ValueError) as error:  # transformers reports a failed download or a bad folder so
        raise ConfigError(
            f"--text_encoder {model_config.text_encoder}: could not be loaded "
            f"({str(error).splitlines()[0][:120]}); give a local folder, or use --text_encoder scratch"
        ) from None
