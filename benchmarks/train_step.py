"""Training-step throughput of the scGPT model, side by side with the original scGPT architecture.

One training step = a collated batch (already on the device) -> model forward -> weighted objectives
(gep + gen + mvc, weight 1 each, as in conf/task/pretrain.yaml) -> backward -> AdamW step. Collation is
timed on its own (cells/s). Cells are synthetic: each expresses a uniformly random share in
[--min-frac, --max-frac] of ``max_seq_len - 1`` genes, so batches have realistic variable lengths. The
same cells, collated with the same seed (hence the same masks), feed every variant, and every model
starts from the same ``torch.manual_seed`` initialisation.

Variants, all timed interleaved in one run (step i of every variant before step i + 1, so load from
other processes falls on all alike):
- ``original/padded``: the ORIGINAL scGPT architecture on padded batches, torch ``nn.TransformerEncoder``
  (benchmarks/original_scgpt.py, written from ../shared/specs/scgpt-format.md): the baseline. It drops
  out attention probabilities as torch's layer does; ``ScGPTModel`` does not, and
  ``--original-attention-dropout 0`` takes that work out of the comparison;
- ``<backend>/<layout>``: our ``ScGPTModel`` with each attention backend (sdpa, reference, torch_varlen:
  the plain-torch stand-in for flash-attn's varlen path; flash_attn: CUDA + flash-attn only, skipped
  with a note otherwise; flash_attn_lse_call: PyTorch's flash kernel with the log-sum-exp gradient from
  one more varlen call per layer instead of folded into its backward; flash_attn4, cudnn, flex,
  flex_flash: CUDA only, skipped with the reason otherwise) on padded and packed batches;
- ``<backend>/packed+<extra>`` for ``--extras`` (several options joined by ``+`` run together): ``compile`` (torch.compile of the encoder layers'
  per-token blocks, dynamic token count; compile time falls in the warm-up steps), ``checkpointing``
  (activation checkpointing of every encoder layer), ``fused_adamw`` (``AdamW(fused=True)``).

Prints one JSON object per line: ``collate`` per (shape, layout), ``train_step`` per (shape, variant)
with seconds per step (median and fastest), cells/s, real tokens/s and model TFLOP/s (scgpt.flops:
real tokens only, 3 x forward), ``skipped`` notes, and a final ``summary`` with, per shape,
``speedup_vs_original`` (original/padded median s/step over the variant's), ``speedup_vs_padded`` and
``speedup_vs_packed`` (the same backend's padded / packed median over the variant's), plus the same ratios
of the fastest steps (``_best_step``) and of the median process-CPU seconds (``_cpu_time``: robust to other
processes on a shared machine, unlike wall time; per record ``cpu_seconds_per_step``). ``--layouts padded,packed,packed_known_first`` adds the known-first packed layout
(every cell's known tokens, then every cell's generated ones; ``speedup_vs_packed`` compares it with packed).

Commands recorded in BENCHMARKS.md (CPU; --threads 1 because the 2-core machine is shared):
    python benchmarks/train_step.py --shapes tiny --backends sdpa,reference,torch_varlen,flash_attn --batch-size 32 --steps 20 --warmup 2 --threads 1
    python benchmarks/train_step.py --shapes whole_human --n-layers 2 --backends sdpa,torch_varlen --batch-size 8 --steps 4 --warmup 1 --threads 1
Known-first vs packed (BENCHMARKS.md, issue 16):
    OMP_NUM_THREADS=2 nice python benchmarks/train_step.py --shapes tiny,small --backends sdpa,torch_varlen --layouts packed,packed_known_first --no-original --batch-size 16 --steps 20 --warmup 2 --threads 2
On a GPU (bf16 autocast; prints MFU against the bf16 peak of the device):
    python benchmarks/train_step.py --shapes whole_human --backends sdpa,flash_attn --device cuda --dtype bfloat16 --batch-size 32 --steps 20 --warmup 5 --extras compile,fused_adamw
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
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # original_scgpt, run as a script from anywhere

from data_modules.collate import CellBatch, CellCollator, CollatorConfig  # noqa: E402
from original_scgpt import OriginalScGPT  # noqa: E402
from scgpt.config import ModelConfig  # noqa: E402
from scgpt.flops import count_flops, generated_per_cell, mfu, peak_tflops  # noqa: E402
from scgpt.model.attention import VarlenAttention, torch_flash_varlen_kernel, torch_varlen_kernel  # noqa: E402
from scgpt.model.attention_backends import GPU_BACKENDS, build_attention_backend, flash_attn_available  # noqa: E402
from scgpt.errors import ConfigError  # noqa: E402
from scgpt.model.scgpt import ScGPTModel  # noqa: E402
from scgpt.objectives import ObjectiveContext, build_objectives  # noqa: E402

SHAPES = {  # dropout is each shape's default (conf/model/tiny.yaml, conf/model/scgpt_whole_human.yaml)
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_hid=128, max_seq_len=256, n_bins=51, dropout=0.1),
    "small": dict(d_model=256, n_layers=4, n_heads=8, d_hid=512, max_seq_len=600, n_bins=51, dropout=0.1),
    "whole_human": dict(d_model=512, n_layers=12, n_heads=8, d_hid=512, max_seq_len=1200, n_bins=51, dropout=0.2),
}
BACKENDS = ("sdpa", "reference", "flash_attn", "torch_varlen", "flash_attn_lse_call", *GPU_BACKENDS)
LAYOUTS = ("padded", "packed", "packed_known_first")
EXTRAS = ("compile", "checkpointing", "fused_adamw")
OBJECTIVE_WEIGHTS = {"gep": 1.0, "gen": 1.0, "mvc": 1.0}
N_SPECIALS = 3  # <pad>, <cls>, <eoc> follow the genes, as in GeneVocab.from_genes
BASELINE = "original/padded"


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or (not items and text):
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def _extras(text: str) -> list[str]:
    """Comma-separated variants, each one speed option or several joined by '+'."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if not set(t.split("+")) <= set(EXTRAS)]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad!r}: each variant is one of {', '.join(EXTRAS)} or several joined by '+'")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=_csv(tuple(SHAPES)), default=["tiny"])
    p.add_argument("--n-layers", type=int, default=None, help="override the shape's encoder depth")
    p.add_argument("--backends", type=_csv(BACKENDS), default=["sdpa", "reference"])
    p.add_argument("--layouts", type=_csv(LAYOUTS), default=["padded", "packed"],
                   help="packed_known_first: every cell's known tokens, then every cell's generated ones")
    p.add_argument("--extras", type=_extras, default=[],
                   help="extra packed variants per backend; '+' combines options, e.g. compile+fused_adamw")
    p.add_argument("--no-original", action="store_true", help="leave out the original-architecture baseline")
    p.add_argument("--original-attention-dropout", type=float, default=None,
                   help="dropout on the baseline's attention probabilities; default: the model's dropout, as "
                        "torch's nn.TransformerEncoderLayer (and the original scGPT) applies it; ScGPTModel has none")
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
    p.add_argument("--group-tolerance", type=float, default=None,
                   help="packed sdpa/reference: attend cells of similar length together (see attention.py)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: bf16 table)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS more steps of each variant: a 'profile' line (wall, device-busy "
                        "and host-side ms per step, kernels per step) and the top operators on stderr")
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


def _torch_flash_lse_by_extra_call(*args):
    """PyTorch's flash kernel with its lse gradient dropped: the lse gradient then comes from one more varlen
    call per layer (attention.lse_gradient_keys), as before the folding in varlen_kernels.py."""
    out, lse = torch_flash_varlen_kernel(*args)
    return out, lse.detach()


def make_backend(name: str, group_tolerance: float | None = None):
    if name == "torch_varlen":
        backend = VarlenAttention(torch_varlen_kernel, "torch_varlen")
    elif name == "flash_attn_lse_call":
        backend = VarlenAttention(_torch_flash_lse_by_extra_call, "flash_attn(torch, lse by extra call)")
    else:
        backend = build_attention_backend(name)
    if group_tolerance is not None:
        backend.group_tolerance = group_tolerance
    return backend


@contextlib.contextmanager
def flash_impl(backend: str):
    """FlashAttention-4 in PyTorch's aten flash ops for ``flash_attn4`` only: its activation is process-wide,
    so interleaved variants switch it on around their own steps (and back to the default for the others)."""
    if not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl, \
        restore_flash_attention_impl

    wanted = "FA4" if backend == "flash_attn4" else None
    if current_flash_attention_impl() != wanted and wanted:
        activate_flash_attention_impl(wanted)
    elif current_flash_attention_impl() != wanted:
        restore_flash_attention_impl(_raise_warn=False)
    yield


def make_optimizer(model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW as PretrainTask builds it: weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98), **({"fused": True} if fused else {}))


StepFn = Callable[[CellBatch], None]


def ours(args, cfg: ModelConfig, backend: str, device: torch.device, extra: str | None = None) -> StepFn:
    """A training step of ScGPTModel with ``backend`` (and optional speed options joined by '+'), seeded init."""
    options = set(extra.split("+")) if extra else set()
    torch.manual_seed(args.seed)
    model = ScGPTModel(cfg, make_backend(backend, args.group_tolerance)).to(device).train()
    model.transformer_encoder.activation_checkpointing = "checkpointing" in options
    if "compile" in options:
        model.transformer_encoder.compile_token_ops()  # as PretrainTask(compile=True)
    optimizer = make_optimizer(model, fused="fused_adamw" in options)
    objectives = build_objectives(OBJECTIVE_WEIGHTS, None, cfg)

    def step(batch: CellBatch) -> None:
        with flash_impl(backend):
            with autocast(device, args.dtype):
                gen_mask = batch.gen_mask if bool(batch.generative.any()) else None
                out = model(batch.gene_ids, batch.values, batch.layout, gen_mask=gen_mask)
                loss = sum(o.weight * sum(o(out, batch, ObjectiveContext()).values()) for o in objectives)
            finish(loss, optimizer)
    return step


def original(args, cfg: ModelConfig, device: torch.device) -> StepFn:
    """A training step of the original scGPT architecture (padded nn.TransformerEncoder)."""
    torch.manual_seed(args.seed)
    model = OriginalScGPT(cfg, args.original_attention_dropout).to(device).train()
    optimizer = make_optimizer(model)
    objectives = build_objectives(OBJECTIVE_WEIGHTS, None, cfg)

    def step(batch: CellBatch) -> None:
        with autocast(device, args.dtype):
            gen_mask = batch.gen_mask if bool(batch.generative.any()) else None
            out = model(batch.gene_ids, batch.values, batch.padding_mask, gen_mask)
            loss = sum(o.weight * sum(o(out, batch, ObjectiveContext()).values()) for o in objectives)
        finish(loss, optimizer)
    return step


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def finish(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


Timings = dict[str, list[float]]  # variant -> seconds of each timed step


def time_interleaved(args, variants: dict[str, tuple[StepFn, list[CellBatch]]],
                     device: torch.device) -> tuple[Timings, Timings]:
    """Wall and process-CPU seconds of each timed step per variant. Step i runs batch i on every variant
    before step i + 1, so background load on a shared machine falls on all alike, in an order rotated by
    one each step so that no variant always runs first; ``warmup`` steps are not timed. CPU seconds (all
    threads of this process) hardly grow when other processes share the cores, wall seconds do."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wall: Timings = {name: [] for name in variants}
    cpu: Timings = {name: [] for name in variants}
    names = list(variants)
    for i in range(args.warmup + args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            step, batches = variants[name]
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            step(batches[i])
            sync()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def profile_variants(args, variants: dict[str, tuple[StepFn, list[CellBatch]]], device: torch.device,
                     common: dict) -> None:
    """Where a step's time goes: device-busy time (kernels) against wall time says whether the step is
    bound by the GPU or by the host launching work; the operator table says which work."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, (step, batches) in variants.items():
        chosen = batches[-args.profile:]
        sync()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for batch in chosen:
                step(batch)
            sync()
            wall = (time.perf_counter() - start) / len(chosen)
        events = prof.key_averages()
        on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, memcpy, memset
        device_us = sum(e.self_device_time_total for e in on_device) / len(chosen)
        kernels = sum(e.count for e in on_device) / len(chosen)
        emit(dict(kind="profile", variant=name, steps=len(chosen), wall_ms_per_step=wall * 1e3,
                  device_busy_ms_per_step=device_us / 1e3, device_busy_fraction=device_us / 1e6 / wall,
                  kernels_per_step=kernels, **common))
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"== profile {name}", file=sys.stderr)
        print(events.table(sort_by=sort, row_limit=18, max_name_column_width=60), file=sys.stderr)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def build_variants(args, cfg, shape_name, batches, device) -> dict[str, tuple[StepFn, list[CellBatch]]]:
    variants = {} if args.no_original else {BASELINE: (original(args, cfg, device), batches["padded"])}
    for backend in args.backends:
        if backend in ("flash_attn", "flash_attn_lse_call") and not (device.type == "cuda" and flash_attn_available()):
            emit(dict(kind="skipped", shape=shape_name, backend=backend,
                      reason="flash_attn needs CUDA and the flash-attn package"))
            continue
        if backend in GPU_BACKENDS:
            try:
                build_attention_backend(backend)
            except ConfigError as error:  # flash_attn4 / cudnn / flex*: CUDA (and wheels) only
                emit(dict(kind="skipped", shape=shape_name, backend=backend, reason=str(error)))
                continue
        for layout in args.layouts:
            variants[f"{backend}/{layout}"] = (ours(args, cfg, backend, device), batches[layout])
        for extra in args.extras:
            if "fused_adamw" in extra.split("+") and device.type == "cpu" and not _fused_adamw_on_cpu():
                emit(dict(kind="skipped", shape=shape_name, backend=backend, extra=extra,
                          reason=f"AdamW(fused=True) is not available on CPU in torch {torch.__version__}"))
                continue
            variants[f"{backend}/packed+{extra}"] = (ours(args, cfg, backend, device, extra), batches["packed"])
    return variants


def _fused_adamw_on_cpu() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def bench_shape(args, shape_name: str, device: torch.device, common: dict) -> tuple[Timings, Timings]:
    """Run every variant for one shape; -> wall and CPU {variant: seconds of each timed step}."""
    shape = dict(SHAPES[shape_name], **({"n_layers": args.n_layers} if args.n_layers else {}))
    cfg = ModelConfig(vocab_size=args.vocab_size, pad_token_id=args.vocab_size - N_SPECIALS, **shape)
    rng = np.random.default_rng(args.seed)
    cells = synthetic_cells(rng, args.batch_size * (args.warmup + args.steps), args.vocab_size - N_SPECIALS,
                            shape["max_seq_len"] - 1, args.min_frac, args.max_frac)
    batches = {}
    for layout in dict.fromkeys(["padded", "packed", *args.layouts]):  # padded feeds the baseline and the token counts
        batches[layout], seconds = collate(args, shape, layout, cells)
        emit(dict(kind="collate", shape=shape_name, layout=layout, cells=len(cells),
                  cells_per_s=len(cells) / seconds, **common))
        batches[layout] = [to_device(b, device) for b in batches[layout]]
    timed = batches["padded"][args.warmup:]
    padded_tokens = statistics.mean(b.gene_ids.numel() for b in timed)
    real_tokens = statistics.mean(b.n_tokens for b in timed)
    counts = [count_flops(cfg, b.layout.lengths, generated_per_cell(b.gen_mask if bool(b.generative.any()) else None))
              for b in timed]
    flops = statistics.mean(c.training_step for c in counts)  # model FLOPs (dense l x l attention per cell)
    work_done = statistics.mean(c.training_step_work_done for c in counts)  # the pairs the generative mask computes
    peak = args.peak_tflops or (peak_tflops(device_name(device), "bf16") if args.dtype == "bfloat16" else None)
    variants = build_variants(args, cfg, shape_name, batches, device)
    results, cpu = time_interleaved(args, variants, device)
    for name, seconds in results.items():
        median = statistics.median(seconds)
        emit(dict(kind="train_step", shape=shape_name, n_layers=cfg.n_layers, variant=name,
                  batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, seconds_per_step=median,
                  seconds_per_step_min=min(seconds), cpu_seconds_per_step=statistics.median(cpu[name]),
                  cpu_seconds_per_step_min=min(cpu[name]), cells_per_s=args.batch_size / median,
                  tokens_per_s=real_tokens / median, tflops_per_s=flops / median / 1e12,
                  mfu=mfu(flops, median, peak), peak_tflops=peak, flops_per_step=flops,
                  tflops_per_s_work_done=work_done / median / 1e12, mfu_work_done=mfu(work_done, median, peak),
                  flops_per_step_work_done=work_done,
                  padded_tokens_per_batch=padded_tokens, real_tokens_per_batch=real_tokens, **common))
    if args.profile:
        profile_variants(args, variants, device, common)
    return results, cpu


def ratios(results: dict[str, list[float]], reduce, against: str = "padded") -> dict[str, float]:
    """Speed-up of each variant over ``against``: the original baseline (``"original"``) or the same backend
    on that layout, of ``reduce`` (median or min) seconds."""
    out = {}
    for name, seconds in results.items():
        base = BASELINE if against == "original" else name.split("/")[0] + "/" + against
        if base in results and name not in (base, BASELINE):
            out[name] = reduce(results[base]) / reduce(seconds)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    common = dict(device=args.device, device_name=device_name(device), torch=torch.__version__,
                  threads=torch.get_num_threads(), dtype=args.dtype, seed=args.seed, vocab_size=args.vocab_size,
                  min_frac=args.min_frac, max_frac=args.max_frac, generative_fraction=args.generative_fraction)
    summary = {}
    for shape_name in args.shapes:
        results, cpu = bench_shape(args, shape_name, device, common)
        for against in ("original", "padded", "packed"):
            for suffix, timings, reduce in (("", results, statistics.median), ("_best_step", results, min),
                                            ("_cpu_time", cpu, statistics.median)):
                summary.setdefault(f"speedup_vs_{against}{suffix}", {})[shape_name] = ratios(timings, reduce, against)
    emit(dict(kind="summary", **summary, original_attention_dropout=args.original_attention_dropout, n_layers={s: args.n_layers or SHAPES[s]["n_layers"] for s in args.shapes},
              **common))
    return 0


if __name__ == "__main__":
    sys.exit(main())
