"""Seeded ``torch.Generator``s derived from named coordinates, never from global random state."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*coordinates: int) -> int:
    """A 63-bit seed that is a pure function of the coordinates, e.g. (seed, epoch, rank, worker, step)."""
    if any(int(c) < 0 for c in coordinates):
        raise ValueError(f"seed coordinates must be non-negative, got {coordinates}")
    state = np.random.SeedSequence([int(c) for c in coordinates]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_generator(*coordinates: int, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*coordinates))
    return generator
