"""Attention kernels alone, side by side on the same packed batch: forward + backward per layer call.

The batch is a collated whole-human batch of synthetic cells (cells 20-100% of ``max_seq_len - 1`` genes,
``--generative-fraction`` of cells with the generative mask), so every backend sees the same ``cu_seqlens``
and generated tokens; q, k, v are random (T, H, Dh) tensors. Each backend builds its per-forward plan once
(as the encoder does for its layers) and is then timed over ``--calls`` calls of ``packed`` forward +
backward, interleaved across backends (call i of each before call i + 1). Backends that cannot run here are
skipped with their one-line reason. Prints one JSON line per backend: ms per call (median, fastest), and
TFLOP/s on the work done (the pairs the generative mask computes, scgpt.flops: 4 d per pair forward, 3x for
forward + backward) and on the dense l^2 model count, plus the largest error against ``reference``.

    python benchmarks/attention_kernels.py --device cuda --dtype bfloat16 \
        --backends flash_attn,flash_attn4,cudnn,flex,flex_flash
    python benchmarks/attention_kernels.py --batch-size 8 --max-seq-len 300 --backends sdpa,torch_varlen --calls 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step, run as a script from anywhere

from train_step import flash_impl, make_backend, synthetic_cells  # noqa: E402

from data_modules.collate import CellCollator, CollatorConfig  # noqa: E402
from scgpt.errors import ConfigError  # noqa: E402
from scgpt.flops import attended_pairs, generated_per_cell  # noqa: E402
from scgpt.model.attention import ReferenceAttention  # noqa: E402
from scgpt.model.layout import TokenLayout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="sdpa,torch_varlen")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--generative-fraction", type=float, default=0.5)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def packed_batch(args):
    """(cu_seqlens (B + 1,), max_seqlen, gen_mask (T,) or None) of one collated batch."""
    n_genes = 4000
    cells = synthetic_cells(np.random.default_rng(args.seed), args.batch_size, n_genes, args.max_seq_len - 1, 0.2, 1.0)
    collator = CellCollator(CollatorConfig(pad_token_id=n_genes, cls_token_id=n_genes + 1, max_seq_len=args.max_seq_len,
                                           generative_fraction=args.generative_fraction, layout="packed"))
    batch = collator(cells, torch.Generator().manual_seed(args.seed))
    gen = batch.gen_mask if bool(batch.generative.any()) else None
    return batch.layout.cu_seqlens, batch.layout.max_seqlen, gen


def call(backend, plan, q, k, v, cu, max_len, gen, grad):
    """One forward + backward of the packed attention -> (out, q/k/v gradients)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = backend.packed(*leaves, cu, max_len, gen, plan)
    out.backward(grad)
    return out, [t.grad for t in leaves]


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cu, max_len, gen = (t.to(device) if isinstance(t, torch.Tensor) else t for t in packed_batch(args))
    n_tokens = int(cu[-1])
    g = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v, grad = (torch.randn(n_tokens, args.heads, args.head_dim, generator=g, device=device, dtype=dtype)
                     for _ in range(4))
    lengths = (cu[1:] - cu[:-1]).cpu().double()
    per_pair = 3 * 4 * args.heads * args.head_dim  # forward + backward
    work = per_pair * attended_pairs(lengths, generated_per_cell(gen, TokenLayout(cu_seqlens=cu)) if gen is not None else None)
    model = per_pair * attended_pairs(lengths, None)
    expected = call(ReferenceAttention(), None, q.float(), k.float(), v.float(), cu, max_len, gen, grad.float())
    backends = {}
    for name in args.backends.split(","):
        try:
            backend = make_backend(name)
        except ConfigError as error:
            print(json.dumps({"kind": "skipped", "backend": name, "reason": str(error)}), flush=True)
            continue
        backends[name] = (backend, backend.plan(cu, max_len, gen))
    seconds = {name: [] for name in backends}
    errors = {}
    for i in range(args.warmup + args.calls):
        for name, (backend, plan) in backends.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with flash_impl(name):  # flash_attn4 switches PyTorch's flash ops to FA4 for its own calls only
                out, grads = call(backend, plan, q, k, v, cu, max_len, gen, grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
            elif i == 0:
                errors[name] = max(float((a.detach().float() - b.detach()).abs().max())
                                   for a, b in zip([out, *grads], [expected[0], *expected[1]]))
    for name, times in seconds.items():
        median = statistics.median(times)
        print(json.dumps({"kind": "attention", "backend": backends[name][0].name, "option": name, "device": args.device,
                          "dtype": args.dtype, "cells": args.batch_size, "tokens": n_tokens, "calls": len(times),
                          "ms_per_call": 1e3 * median, "ms_per_call_min": 1e3 * min(times),
                          "tflops_work_done": work / median / 1e12, "tflops_model": model / median / 1e12,
                          "max_abs_error_vs_reference": errors[name]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
