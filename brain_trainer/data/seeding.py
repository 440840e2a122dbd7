"""Keyed seeds: randomness as a function of (seed, epoch, index), not of a stream. (The runtime's seeding module
is its home; this stays importable from the data wing until the two are merged.)"""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, epoch, index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # a Python int first: numpy 1.26 cannot shift a uint64 by a Python int
