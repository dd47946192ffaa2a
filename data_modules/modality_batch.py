"""Token-level operations on a collated :class:`~data_modules.collate.CellBatch` with ``modality_ids``:
keep only some tokens (one modality's, for single-modality embeddings and cross-modal views), drop a
modality from a share of cells (modality dropout), and unmask values for embedding. Padded and packed
layouts alike; every per-token field of the batch follows, whatever fields it has."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from data_modules.collate import CellBatch
from data_modules.modality import SPECIAL
from scgpt.model.layout import TokenLayout, cumulative


def unmasked(batch: CellBatch) -> CellBatch:
    """The same tokens with every value visible and no generative cells (for embedding)."""
    return dataclasses.replace(batch, values=torch.where(batch.hidden_mask, batch.target_values, batch.values),
                               hidden_mask=torch.zeros_like(batch.hidden_mask),
                               gen_mask=torch.zeros_like(batch.gen_mask),
                               generative=torch.zeros_like(batch.generative))


def _token_fields(batch: CellBatch) -> list[str]:
    """Names of the per-token tensors (same shape as gene_ids), whatever fields CellBatch has."""
    per_cell = ("generative", "padding_mask", "cu_seqlens", "cu_known", "cu_gen")
    return [f.name for f in dataclasses.fields(batch) if f.name not in per_cell
            and isinstance(getattr(batch, f.name), Tensor) and getattr(batch, f.name).shape == batch.gene_ids.shape]


def _fill_value(name: str, pad_token_id: int, pad_value: float) -> float | int | bool:
    if name == "gene_ids":
        return pad_token_id
    if name in ("values", "target_values"):
        return pad_value
    if name == "modality_ids":
        return SPECIAL
    return 0


def select_tokens(batch: CellBatch, keep: Tensor, pad_token_id: int, pad_value: float) -> CellBatch:
    """Only the tokens where ``keep`` (same shape as gene_ids) and the cell's <cls>, compacted: padded
    cells get shorter with padding after their tokens, packed ones (either order) get new offsets."""
    fields = _token_fields(batch)
    if batch.padding_mask is not None:
        keep = (keep | (torch.arange(keep.shape[1], device=keep.device) == 0)) & ~batch.padding_mask  # (B, L)
        lengths = keep.sum(1)  # (B,)
        width = int(lengths.max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept tokens first, in order
        padding = torch.arange(width, device=keep.device)[None, :] >= lengths[:, None]  # (B, W)
        new = {}
        for name in fields:
            taken = torch.gather(getattr(batch, name), 1, order)
            new[name] = taken.masked_fill(padding, _fill_value(name, pad_token_id, pad_value))
        return dataclasses.replace(batch, **new, padding_mask=padding, max_seqlen=width)
    layout = batch.layout
    keep = keep.clone()
    keep[layout.first_positions] = True  # <cls>
    new = {name: getattr(batch, name)[keep] for name in fields}
    return dataclasses.replace(batch, **new, **_kept_offsets(layout, keep))


def _kept_offsets(layout: TokenLayout, keep: Tensor) -> dict:
    """The offset fields of a packed batch after keeping the tokens where ``keep`` (T,); order is kept."""
    def count(tokens: Tensor) -> Tensor:
        return torch.bincount(layout.seq_ids[tokens], minlength=layout.n_cells)  # (B,)

    if not layout.is_known_first:
        lengths = count(keep)
        return {"cu_seqlens": cumulative(lengths), "max_seqlen": int(lengths.max())}
    known_part = torch.arange(keep.numel(), device=keep.device) < layout.n_known  # (T,)
    n_known, n_gen = count(keep & known_part), count(keep & ~known_part)
    return {"cu_known": cumulative(n_known), "cu_gen": cumulative(n_gen), "max_seqlen": int((n_known + n_gen).max()),
            "max_known": int(n_known.max()), "max_gen": int(n_gen.max())}


def drop_modalities(batch: CellBatch, share: float, generator: torch.Generator, pad_token_id: int,
                    pad_value: float) -> CellBatch:
    """A ``share`` of the cells with two or more modalities lose all tokens of one of them (uniformly
    chosen among the cell's modalities)."""
    mods = batch.modality_ids
    if batch.padding_mask is not None:
        cell = torch.arange(mods.shape[0], device=mods.device)[:, None].expand_as(mods)  # (B, L)
    else:
        cell = batch.layout.seq_ids  # (T,), any packed order
    feature = mods != SPECIAL
    present = torch.zeros(batch.n_cells, SPECIAL, dtype=torch.bool, device=mods.device)  # (B, 3)
    present[cell[feature], mods[feature]] = True
    # draws on the generator's device (the host), used where the batch lives: the same draws on CPU and GPU
    draws = torch.rand(batch.n_cells, generator=generator).to(mods.device)  # (B,)
    drop_cell = (draws < share) & (present.sum(1) >= 2)  # (B,)
    scores = torch.rand(batch.n_cells, SPECIAL, generator=generator).to(mods.device).masked_fill(~present, -1.0)
    dropped = scores.argmax(1)  # (B,) a modality the cell has
    drop = feature & drop_cell[cell] & (mods == dropped[cell])
    return select_tokens(batch, ~drop, pad_token_id, pad_value) if bool(drop.any()) else batch
