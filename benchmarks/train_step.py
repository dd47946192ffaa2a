"""Training-step throughput of the scGPT model: padded vs packed layouts, per attention backend, side by side.

One training step = a collated batch (already on the device) -> model forward -> weighted objectives
(gep + gen + mvc, weight 1 each, as in conf/task/pretrain.yaml) -> backward -> AdamW step. Collation is
timed on its own (cells/s). Cells are synthetic: each expresses a uniformly random share in
[--min-frac, --max-frac] of ``max_seq_len - 1`` genes, so batches have realistic variable lengths. The
same cells, collated with the same seed (hence the same masks), feed both layouts, and every model
starts from the same ``torch.manual_seed`` initialisation.

Layouts are timed interleaved (step i of every layout before step i + 1), so load from other processes
falls on both alike. Prints one JSON object per line: ``collate`` per (shape, layout), ``train_step`` per
(shape, backend, layout), ``skipped`` notes, and a final ``summary`` with ``speedup_packed_vs_padded`` =
padded seconds_per_step / packed seconds_per_step (medians) for each shape and backend, and the same
ratio of the fastest steps (``speedup_packed_vs_padded_best_step``), which is less sensitive to load.

Backends: sdpa, reference, flash_attn (CUDA + flash-attn only; skipped with a note otherwise) and
torch_varlen (the plain-torch stand-in for flash-attn's varlen path, ``VarlenAttention``).

Commands recorded in BENCHMARKS.md (CPU):
    python benchmarks/train_step.py --shapes tiny --backends sdpa,reference,torch_varlen,flash_attn --batch-size 32 --steps 10 --warmup 2
    python benchmarks/train_step.py --shapes whole_human --n-layers 2 --backends sdpa,reference,torch_varlen --batch-size 8 --steps 4 --warmup 1
On a GPU:
    python benchmarks/train_step.py --shapes whole_human --backends sdpa,flash_attn --device cuda --dtype bfloat16 --batch-size 32 --steps 20 --warmup 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from data_modules.collate import CellBatch, CellCollator, CollatorConfig
from scgpt.config import ModelConfig
from scgpt.model.attention import (VarlenAttention, build_attention_backend, flash_attn_available,
                                   torch_varlen_kernel)
from scgpt.model.scgpt import ScGPTModel
from scgpt.objectives import ObjectiveContext, build_objectives

SHAPES = {  # dropout is each shape's default (conf/model/tiny.yaml, conf/model/scgpt_whole_human.yaml)
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_hid=128, max_seq_len=256, n_bins=51, dropout=0.1),
    "whole_human": dict(d_model=512, n_layers=12, n_heads=8, d_hid=512, max_seq_len=1200, n_bins=51, dropout=0.2),
}
BACKENDS = ("sdpa", "reference", "flash_attn", "torch_varlen")
LAYOUTS = ("padded", "packed")
OBJECTIVE_WEIGHTS = {"gep": 1.0, "gen": 1.0, "mvc": 1.0}
N_SPECIALS = 3  # <pad>, <cls>, <eoc> follow the genes, as in GeneVocab.from_genes


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=_csv(tuple(SHAPES)), default=["tiny"])
    p.add_argument("--n-layers", type=int, default=None, help="override the shape's encoder depth")
    p.add_argument("--backends", type=_csv(BACKENDS), default=["sdpa", "reference"])
    p.add_argument("--layouts", type=_csv(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast")
    p.add_argument("--min-frac", type=float, default=0.2)
    p.add_argument("--max-frac", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=2000, help="embedding table size, 3 special tokens included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generative-fraction", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if not 0.0 < args.min_frac <= args.max_frac <= 1.0:
        p.error("--min-frac/--max-frac: need 0 < min-frac <= max-frac <= 1")
    longest = max(SHAPES[s]["max_seq_len"] for s in args.shapes) - 1
    if args.vocab_size - N_SPECIALS < longest:
        p.error(f"--vocab-size: needs at least {longest + N_SPECIALS} to draw {longest} distinct genes per cell")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def synthetic_cells(rng: np.random.Generator, n_cells: int, n_genes: int, max_genes: int,
                    min_frac: float, max_frac: float) -> list[dict]:
    """Sparse cells: distinct random genes, a uniform share of ``max_genes`` each, counts >= 1."""
    cells = []
    for share in rng.uniform(min_frac, max_frac, size=n_cells):
        n = max(1, int(round(share * max_genes)))
        gene_ids = rng.choice(n_genes, size=n, replace=False)
        counts = rng.geometric(0.3, size=n).astype(np.float32)  # >= 1, mostly small, long tail
        cells.append({"gene_ids": gene_ids, "counts": counts})
    return cells


def collate(args, shape: dict, layout: str, cells: list[dict]) -> tuple[list[CellBatch], float]:
    """All batches for one layout, and the seconds the collator took (after one untimed warm-up batch)."""
    n_genes = args.vocab_size - N_SPECIALS
    collator = CellCollator(CollatorConfig(
        pad_token_id=n_genes, cls_token_id=n_genes + 1, max_seq_len=shape["max_seq_len"], n_bins=shape["n_bins"],
        generative_fraction=args.generative_fraction, layout=layout))
    collator(cells[:args.batch_size], torch.Generator().manual_seed(args.seed))  # untimed: first-call costs
    generator = torch.Generator().manual_seed(args.seed)  # same seed per layout: same masks
    start = time.perf_counter()
    batches = [collator(cells[i:i + args.batch_size], generator) for i in range(0, len(cells), args.batch_size)]
    return batches, time.perf_counter() - start


def to_device(batch: CellBatch, device: torch.device) -> CellBatch:
    moved = {f.name: getattr(batch, f.name) for f in fields(batch)}
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    moved["labels"] = {k: v.to(device) for k, v in batch.labels.items()}
    return CellBatch(**moved)


def make_backend(name: str):
    if name == "torch_varlen":
        return VarlenAttention(torch_varlen_kernel, "torch_varlen")
    return build_attention_backend(name)


def make_trainer(args, cfg: ModelConfig, backend_name: str, device: torch.device):
    """(model, objectives, optimizer) as PretrainTask builds them, seeded for identical init."""
    torch.manual_seed(args.seed)
    model = ScGPTModel(cfg, make_backend(backend_name)).to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    return model, build_objectives(OBJECTIVE_WEIGHTS, None, cfg), optimizer


def train_step(model, objectives, optimizer, batch: CellBatch, device: torch.device, dtype: str) -> None:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with autocast:
        gen_mask = batch.gen_mask if bool(batch.generative.any()) else None
        out = model(batch.gene_ids, batch.values, batch.layout, gen_mask=gen_mask)
        ctx = ObjectiveContext()
        loss = sum(o.weight * sum(o(out, batch, ctx).values()) for o in objectives)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_interleaved(args, cfg: ModelConfig, backend: str, batches: dict[str, list[CellBatch]],
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds of each timed step per layout. Step i runs batch i on every layout before step i + 1, so
    background load on a shared machine falls on all layouts alike; ``warmup`` steps are not timed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    trainers = {layout: make_trainer(args, cfg, backend, device) for layout in args.layouts}
    on_device = {layout: [to_device(b, device) for b in batches[layout]] for layout in args.layouts}
    seconds: dict[str, list[float]] = {layout: [] for layout in args.layouts}
    for i in range(args.warmup + args.steps):
        for layout in args.layouts:
            sync()
            start = time.perf_counter()
            train_step(*trainers[layout], on_device[layout][i], device, args.dtype)
            sync()
            if i >= args.warmup:
                seconds[layout].append(time.perf_counter() - start)
    return seconds


def token_counts(padded: list[CellBatch]) -> tuple[float, float]:
    """Mean (padded B x L, real non-pad incl. <cls>) tokens per batch."""
    return (statistics.mean(b.gene_ids.numel() for b in padded), statistics.mean(b.n_tokens for b in padded))


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def bench_shape(args, shape_name: str, device: torch.device, common: dict) -> dict[str, dict[str, list[float]]]:
    """Run every (backend, layout) for one shape; -> {backend: {layout: seconds of each timed step}}."""
    shape = dict(SHAPES[shape_name], **({"n_layers": args.n_layers} if args.n_layers else {}))
    cfg = ModelConfig(vocab_size=args.vocab_size, pad_token_id=args.vocab_size - N_SPECIALS, **shape)
    rng = np.random.default_rng(args.seed)
    cells = synthetic_cells(rng, args.batch_size * (args.warmup + args.steps), args.vocab_size - N_SPECIALS,
                            shape["max_seq_len"] - 1, args.min_frac, args.max_frac)
    batches = {}
    for layout in LAYOUTS:  # padded always: it gives the token counts
        batches[layout], seconds = collate(args, shape, layout, cells)
        emit(dict(kind="collate", shape=shape_name, layout=layout, cells=len(cells),
                  cells_per_s=len(cells) / seconds, **common))
    padded_tokens, real_tokens = token_counts(batches["padded"])
    results = {}
    for backend in args.backends:
        if backend == "flash_attn" and not (device.type == "cuda" and flash_attn_available()):
            emit(dict(kind="skipped", shape=shape_name, backend=backend,
                      reason="flash_attn needs CUDA and the flash-attn package"))
            continue
        results[backend] = time_interleaved(args, cfg, backend, batches, device)
        for layout, seconds in results[backend].items():
            median = statistics.median(seconds)
            emit(dict(kind="train_step", shape=shape_name, n_layers=cfg.n_layers, backend=backend, layout=layout,
                      batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, seconds_per_step=median,
                      seconds_per_step_min=min(seconds), cells_per_s=args.batch_size / median,
                      tokens_per_s=real_tokens / median, padded_tokens_per_batch=padded_tokens,
                      real_tokens_per_batch=real_tokens, **common))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    common = dict(device=args.device, device_name=device_name(device), torch=torch.__version__,
                  threads=torch.get_num_threads(), dtype=args.dtype, seed=args.seed, vocab_size=args.vocab_size,
                  min_frac=args.min_frac, max_frac=args.max_frac, generative_fraction=args.generative_fraction)
    median_ratio, best_ratio = {}, {}
    for shape_name in args.shapes:
        for backend, by_layout in bench_shape(args, shape_name, device, common).items():
            if {"padded", "packed"} <= set(by_layout):
                padded, packed = by_layout["padded"], by_layout["packed"]
                median_ratio.setdefault(shape_name, {})[backend] = statistics.median(padded) / statistics.median(packed)
                best_ratio.setdefault(shape_name, {})[backend] = min(padded) / min(packed)
    emit(dict(kind="summary", speedup_packed_vs_padded=median_ratio, speedup_packed_vs_padded_best_step=best_ratio,
              n_layers={s: args.n_layers or SHAPES[s]["n_layers"] for s in args.shapes}, **common))
    return 0


if __name__ == "__main__":
    sys.exit(main())
