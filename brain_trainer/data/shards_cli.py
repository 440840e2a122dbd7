"""`brain-trainer shards index PATTERN`: index WebDataset shards up front (training indexes them if needed).

brain-trainer shards index 'data/cc/{00000..00099}.tar' --cache_dir .brain_cache
brain-trainer shards index 's3://bucket/cc/{00000..41455}.tar' --storage_options '{"endpoint_url": "..."}'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brain_trainer.config import _json_object
from brain_trainer.data.shards import ShardError, load_index

DEFAULT_CACHE_DIR = Path(".brain_cache")


def index_dir(cache_dir: Path) -> Path:
    """Where the shards' index lives under a cache folder (training and this command agree)."""
    return Path(cache_dir) / "shard_index"


def main(argv: list[str] | None = None, prog: str = "brain-trainer shards") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="WebDataset shards: build their index once.")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="index the shards of a pattern (reused while a shard is unchanged)")
    index.add_argument("pattern", help="shards: a brace pattern, several joined by '::', local paths or s3:// URLs")
    index.add_argument(
        "--cache_dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="the index goes in CACHE_DIR/shard_index; give training the same --cache_dir (default: .brain_cache)",
    )
    index.add_argument(
        "--storage_options", type=_json_object, default={}, help="JSON options for the object store's client"
    )
    args = parser.parse_args(argv)
    try:
        found = load_index(
            args.pattern,
            index_dir=index_dir(args.cache_dir),
            storage_options=args.storage_options,
            flag="",
            progress=sys.stderr.isatty(),
        )
    except ShardError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    for problem in found.problems:
        print(f"⚠ {problem}")
    print(
        f"{len(found.shards)} shards, {len(found)} samples (one per caption); indexed {found.built}, "
        f"reused {len(found.shards) - found.built}; index in {index_dir(args.cache_dir)}"
    )
    return 0
