"""`brain-trainer export`: a checkpoint as files other programs load.

    brain-trainer export --checkpoint checkpoints_brain_v2/best_brain_v2.pt --out brain_export
    brain-trainer export --checkpoint checkpoints_brain_v2/best_brain_v2.pt --out brain_onnx --format onnx

safetensors (the default) writes model.safetensors, config.json (the run's config, the preprocessing, the
source checkpoint's sha256) and the tokenizer (tokenizer.json, or a tokenizer/ folder for a pretrained text
encoder); load it back with

    from brain_trainer import load_brain
    brain = load_brain("brain_export")   # the model in eval mode, brain.preprocess, brain.tokenizer

onnx writes image_tower.onnx (normalised float images (B, 3, S, S) -> (B, d) embeddings) and text_tower.onnx
(input_ids, attention_mask (B, L) int64 -> (B, d)), beside config.json and the tokenizer; each tower is run
by onnxruntime against the PyTorch model on the same inputs after export, and the export is refused when they
differ by more than 1e-4 (fp32). Needs the `export` extra: pip install 'brain-trainer[export]'.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from brain_trainer import __version__
from brain_trainer.data.augment import IMAGENET_MEAN, IMAGENET_STD
from brain_trainer.inference.common import Parser, run_command
from brain_trainer.inference.load import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_TOKENIZER,
    EXPORT_TOKENIZER_DIR,
    EXPORT_WEIGHTS,
    Brain,
    InferenceError,
    load_brain,
)
from brain_trainer.inference.onnx_export import IMAGE_TOWER, TEXT_TOWER, ExportMismatch, export_onnx
from brain_trainer.safe_files import (
    describe,
    make_folder,
    output_folder,
    private_folder,
    publish,
    write_bytes,
)

FORMATS = ("safetensors", "onnx")
EXPORT_NAMES = (EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_TOKENIZER, EXPORT_TOKENIZER_DIR, IMAGE_TOWER, TEXT_TOWER)
TEMPORARY = re.compile(r"^\.(.+\.tmp-\d+-[0-9a-f]{8}|scratch-.+)$")  # a write in progress (brain_trainer.safe_files)


def is_export_config(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT


def prepare_out(out: Path, *, overwrite: bool) -> None:
    """Before any work: `--out` can be written and holds only an earlier export's files."""
    output_folder(
        out, "--out", ours=lambda name: name in EXPORT_NAMES or bool(TEMPORARY.match(name)), overwrite=overwrite
    )
    if (out / EXPORT_CONFIG).exists() and not is_export_config(out / EXPORT_CONFIG) and not overwrite:
        raise InferenceError(
            f"--out {out}: its {EXPORT_CONFIG} is not a brain-trainer export; choose an empty or new folder, or "
            f"pass --overwrite to replace it"
        )


def write_config(brain: Brain, out: Path, files: dict) -> None:
    preprocess = brain.preprocess
    meta = {
        "format": EXPORT_FORMAT,
        "program_version": __version__,
        "checkpoint_sha256": brain.checkpoint_sha256,
        "source": str(Path(brain.source).resolve()),
        "config": brain.config,
        "files": files,
        "preprocess": {
            "image_size": preprocess.image_size,
            "decode_shorter_side": preprocess.decode_side,
            "resize": "shorter side to image_size (antialiased), then the centre square",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "max_text_len": brain.model.config.max_text_len,
        },
        "embeddings": {"width": brain.width, "normalized": True},
        "load": f"brain_trainer.load_brain({str(out)!r})",
    }
    write_bytes(out / EXPORT_CONFIG, (json.dumps(meta, indent=2) + "\n").encode())


def write_tokenizer(brain: Brain, out: Path) -> str:
    if brain.tokenizer_json is not None:
        write_bytes(out / EXPORT_TOKENIZER, brain.tokenizer_json.encode())
        return EXPORT_TOKENIZER
    with private_folder(out) as scratch:  # transformers writes the files itself: into a folder nobody else can enter
        brain.tokenizer.save_pretrained(scratch / EXPORT_TOKENIZER_DIR)
        publish(scratch / EXPORT_TOKENIZER_DIR, out / EXPORT_TOKENIZER_DIR)
    return EXPORT_TOKENIZER_DIR


def export_safetensors(brain: Brain, out: Path) -> dict:
    from safetensors.torch import save

    weights = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in brain.model.state_dict().items()}
    metadata = {"format": EXPORT_FORMAT, "checkpoint_sha256": brain.checkpoint_sha256}
    write_bytes(out / EXPORT_WEIGHTS, save(weights, metadata=metadata))
    print(f"✓ {out / EXPORT_WEIGHTS}: {len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} values")
    return {"weights": EXPORT_WEIGHTS}


def export(args: argparse.Namespace) -> int:
    out = args.out
    prepare_out(out, overwrite=args.overwrite)
    brain = load_brain(args.checkpoint, "cpu", "fp32")
    make_folder(out, "--out")
    try:
        if args.format == "onnx":
            files = export_onnx(brain, out)
        else:
            files = export_safetensors(brain, out)
        files["tokenizer"] = write_tokenizer(brain, out)
        write_config(brain, out, files)
    except OSError as error:  # each file is whole or absent; config.json, written last, marks a complete export
        raise InferenceError(f"--out {describe(error, out)}; the export is incomplete: run it again") from None
    print(
        f"Exported {brain.source} to {out} ({args.format}); load it with brain_trainer.load_brain({str(out)!r})"
        if args.format == "safetensors"
        else f"Exported {brain.source} to {out} (onnx)"
    )
    return 0


def main(argv: list[str], prog: str = "brain-trainer export") -> int:
    parser = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint file to export")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--format", choices=FORMATS, default="safetensors", help="default: safetensors")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds files this program did not write (an export's names are replaced)",
    )
    args = parser.parse_args(argv)
    try:
        return run_command(lambda: export(args))
    except ExportMismatch as error:  # not a user mistake: the exporter or the runtime got it wrong
        print(f"Error: {error}", file=sys.stderr)
        return 1
