"""Text: the caption batch (tokenised, padded, cut), the deterministic scratch WordPiece tokenizer, a saved
tokenizer's JSON, and a pretrained Hugging Face tokenizer from the cache or the hub."""

from __future__ import annotations

import logging
from collections import Counter

import torch

from brain_trainer.config import ConfigError


class CaptionCollator:
    """Stacks images and tokenises captions, padded to the longest in the batch and cut at `max_text_len`."""

    def __init__(self, tokenizer, max_text_len: int):
        self.tokenizer, self.max_text_len = tokenizer, max_text_len

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def __call__(self, samples: list[dict]) -> dict:
        # Augmented images are channels-last in memory: stacked as (H, W, 3) views the copy is plain (20x faster
        # than a strided one), and the batch comes out (B, 3, H, W) in channels-last memory, as CNNs prefer.
        images = torch.stack([s["image"].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)
        return {
            "images": images,
            **self.tokenize([s["caption"] for s in samples]),
            "bad_files": [name for s in samples for name in s["bad_files"]],
        }


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_caption_tokenizer(captions: list[str], vocab_size: int = 4000):
    """A WordPiece tokenizer for `--text_encoder scratch`, built from `captions` deterministically.

    The `tokenizers` WordPiece trainer is not deterministic: where the vocabulary limit cuts through
    merges of equal frequency, it learns different token sets on different runs (huggingface/tokenizers#1794),
    so two runs of one command could not be compared. Here the vocabulary is the special tokens, every
    character seen (as a word start and as a `##` continuation, so no word is ever [UNK]), then whole words
    by falling frequency, ties broken by spelling, up to `vocab_size`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for caption in captions for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))
    )
    characters = sorted({character for word in words for character in word})
    pieces = [*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)]
    known = set(pieces)
    by_frequency = [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if w not in known]
    vocab = {token: index for index, token in enumerate([*pieces, *by_frequency][: max(vocab_size, len(pieces))])}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return tokenizer_from_json(tokenizer.to_str())


def tokenizer_from_json(tokenizer_json: str):
    """The Hugging Face tokenizer for a scratch tokenizer saved as JSON (as checkpoints hold it)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        clean_up_tokenization_spaces=False,
    )  # said, so no version warns about its default


def pretrained_tokenizer(name: str):
    """A Hugging Face tokenizer: from the local cache or folder first (no network, no retries), then the hub."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # one line from us, not a screen of retries
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--text_encoder {name}: its tokenizer could not be loaded ({str(error).splitlines()[0][:120]}); "
            f"give a local folder holding a tokenizer, or use --text_encoder scratch"
        ) from None
    finally:
        hub_logger.setLevel(level)
