"""Keyed seeds: randomness as a function of (seed, epoch, index), not of a stream. Their home is the runtime's
seeding module; the data wing's modules import `derive_seed` from here."""

from __future__ import annotations

from brain_trainer.runtime.seeding import derive_seed

__all__ = ["derive_seed"]
