"""`embed` throughput against the evaluation's loader on the same images, and exact search latency over
100,000 stored vectors. Prints one JSON object.

Data: Flickr8k-sized photo-like JPEGs (bench/loader.py's). Model: the demo architecture (shufflenet_v2_x0_5,
64 px, 128-wide shared space) with random weights: throughput does not depend on what the weights learned.

    python bench/embed_search.py [--images 200] [--workers 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from loader import photo_like_dataset  # bench/loader.py: this script's folder is on sys.path

from brain_trainer.brain_model import BrainConfig, BrainModel
from brain_trainer.config import DEMO_SETTINGS
from brain_trainer.data.annotations import Split
from brain_trainer.data.augment import images_to_device
from brain_trainer.data.images import JpegImages
from brain_trainer.data.layouts import load_splits
from brain_trainer.data.loaders import eval_loader
from brain_trainer.data.text import tokenizer_from_json, train_caption_tokenizer
from brain_trainer.inference.embed import embed_files
from brain_trainer.inference.load import Brain
from brain_trainer.inference.search import top_k
from brain_trainer.runtime import Runtime


def demo_brain(captions: list[str], device: torch.device) -> Brain:
    tokenizer_json = train_caption_tokenizer(captions, DEMO_SETTINGS["vocab_size"]).backend_tokenizer.to_str()
    config = {
        **BrainConfig().to_dict(),
        **DEMO_SETTINGS,
        "text_vocab_size": 0,
        "precision": "fp32",
        "cache_images": False,
    }
    tokenizer = tokenizer_from_json(tokenizer_json)
    config["text_vocab_size"] = len(tokenizer)
    model = BrainModel(BrainConfig.from_dict(config), pretrained=False).eval()
    brain = Brain(
        model=model,
        config=config,
        tokenizer=tokenizer,
        tokenizer_json=tokenizer_json,
        checkpoint_sha256="bench",
        source=Path("bench"),
    )
    return brain.to(device, "fp16" if device.type == "cuda" else "fp32")


def timed(action) -> float:
    action()  # warm: workers, page cache, kernels
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def eval_loader_images_per_second(brain: Brain, split: Split, workers: int, batch_size: int) -> float:
    """The evaluation's image path: eval_loader over the split's JPEGs, encode_image under its autocast. The
    loader is made inside the timing, as embed makes its own: both pay for starting their workers."""
    runtime = Runtime(device=brain.device)

    @torch.no_grad()
    def run() -> None:
        loader = eval_loader(
            split,
            JpegImages(split.image_paths()),
            image_size=brain.preprocess.image_size,
            batch_size=batch_size,
            num_workers=workers,
            runtime=runtime,
            seed=0,
        )
        for images, _ in loader:
            with brain.autocast():
                brain.model.encode_image(images_to_device(images, brain.device)).cpu()

    return len(split.images) / timed(run)


def search_latency_ms(width: int, device: torch.device, queries: int, rows: int = 100_000, repeats: int = 7) -> float:
    generator = torch.Generator().manual_seed(0)
    stored = torch.nn.functional.normalize(torch.randn(rows, width, generator=generator), dim=1).numpy()
    query = torch.nn.functional.normalize(torch.randn(queries, width, generator=generator), dim=1).to(device)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        top_k(query, stored, 10)[0].cpu()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        root = photo_like_dataset(Path(folder) / "flickr8k", args.images)
        split = load_splits(root)["train"]
        brain = demo_brain(split.captions, device)
        embed = lambda: embed_files(brain, split.image_paths(), batch_size=args.batch_size, num_workers=args.workers)
        result = {
            "images": len(split.images),
            "workers": args.workers,
            "batch_size": args.batch_size,
            "device": str(device),
            "precision": brain.precision,
            "embed_images_per_s": round(len(split.images) / timed(embed), 1),
            "eval_loader_images_per_s": round(
                eval_loader_images_per_second(brain, split, args.workers, args.batch_size), 1
            ),
        }
    for width in (128, 512):
        for queries in (1, 100):
            result[f"search_100k_d{width}_q{queries}_ms"] = round(search_latency_ms(width, device, queries), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
