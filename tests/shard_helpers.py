"""Helpers shared by the shard tests: shards written with chosen members (a broken image, a missing caption),
a shard cut short, and the drawn look-alike as shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes | str | dict]) -> Path:
    """A tar of `members` (name -> bytes, text, or a dict written as JSON), in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, value in members.items():
            data = json.dumps(value).encode() if isinstance(value, dict) else value
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def colour_shard(path: Path, first: int, count: int) -> Path:
    """`count` one-colour images whose caption names their number (`first` on), as img2dataset lays them out."""
    members = {}
    for number in range(first, first + count):
        key = f"{number:06d}"
        members[f"{key}.jpg"] = jpeg((number * 37 % 256, number * 91 % 256, number * 53 % 256))
        members[f"{key}.txt"] = f"image {number}"
        members[f"{key}.json"] = {"key": key, "caption": f"image {number}"}
    return write_tar(path, members)


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])
