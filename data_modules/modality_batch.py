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


def unmasked(batch: CellBatch) -> CellBatch:
    """The same tokens with every value visible and no generative cells (for embedding)."""
    return dataclasses.replace(batch, values=torch.where(batch.hidden_mask, batch.target_values, batch.values),
                               hidden_mask=torch.zeros_like(batch.hidden_mask),
                               gen_mask=torch.zeros_like(batch.gen_mask),
                               generative=torch.zeros_like(batch.generative))


def _token_fields(batch: CellBatch) -> list[str]:
    """Names of the per-token tensors (same shape as gene_ids), whatever fields CellBatch has."""
    per_cell = ("generative", "padding_mask", "cu_seqlens")
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
    cells get shorter with padding after their tokens, packed ones get new cu_seqlens."""
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
    starts = batch.cu_seqlens[:-1].long()
    keep = keep.clone()
    keep[starts] = True  # <cls>
    cell = torch.repeat_interleave(torch.arange(starts.numel(), device=keep.device),
                                   (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long())  # (T,)
    lengths = torch.bincount(cell[keep], minlength=starts.numel())
    cu_seqlens = torch.zeros_like(batch.cu_seqlens)
    cu_seqlens[1:] = lengths.cumsum(0)
    new = {name: getattr(batch, name)[keep] for name in fields}
    return dataclasses.replace(batch, **new, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))


def drop_modalities(batch: CellBatch, share: float, generator: torch.Generator, pad_token_id: int,
                    pad_value: float) -> CellBatch:
    """A ``share`` of the cells with two or more modalities lose all tokens of one of them (uniformly
    chosen among the cell's modalities)."""
    mods = batch.modality_ids
    if batch.padding_mask is not None:
        cell = torch.arange(mods.shape[0], device=mods.device)[:, None].expand_as(mods)  # (B, L)
    else:
        cell = torch.repeat_interleave(torch.arange(batch.n_cells, device=mods.device),
                                       (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long())  # (T,)
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
