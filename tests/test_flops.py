"""FLOP accounting: a hand count for a tiny model, torch's FLOP counter, peaks and MFU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scgpt.flops import attended_pairs, count_flops, generated_per_cell, mfu, peak_tflops, token_matmul_flops
from scgpt.model import ScGPTModel
from scgpt.model.attention import ReferenceAttention, allowed_keys
from scgpt.model.layout import TokenLayout, cumulative, pack_padded

from conftest import random_tokens, tiny_config


def test_tiny_model_matches_a_hand_count():
    cfg = tiny_config()  # d 32, d_hid 64, 2 layers, continuous values, MVC, no zero probability
    # per token: value encoder 2*32 + 2*32*32 = 2112; layers 2 * (8*32*32 + 4*32*64) = 32768;
    # expression decoder 2*32*32 + 2*32*32 + 2*32 = 4160; MVC 2*32*32 + 2*32*32 + 2*32 = 4160
    assert token_matmul_flops(cfg) == 2112 + 32768 + 4160 + 4160
    count = count_flops(cfg, [5, 3])
    assert count.token_matmuls == 8 * 43200
    assert count.attention == 2 * 4 * 32 * (5 * 5 + 3 * 3)  # layers x 4 d x sum of l^2
    assert count.cell_heads == 0
    assert count.forward == 345600 + 8704
    assert count.training_step == 3 * (345600 + 8704)


def test_heads_and_options_are_counted():
    base = tiny_config()
    zero = tiny_config(explicit_zero_prob=True)
    assert token_matmul_flops(zero) - token_matmul_flops(base) == 4160 + (2 * 32 * 32 + 2 * 32)
    cls = count_flops(tiny_config(n_cls_classes=5, n_layers_cls=3), [4, 4, 4])
    assert cls.cell_heads == 3 * (2 * 2 * 32 * 32 + 2 * 32 * 5)
    batch = tiny_config(n_batch_labels=3)  # decoders see [state; batch embedding]: d_in = 64
    assert token_matmul_flops(batch) == 2112 + 32768 + (2 * 64 * 32 + 2 * 32 * 32 + 2 * 32) + (2 * 32 * 32 + 2 * 32 * 64 + 2 * 64)


def test_forward_count_matches_torch_flop_counter_on_packed_tokens():
    cfg = tiny_config()
    model = ScGPTModel(cfg, ReferenceAttention()).eval()  # plain matmuls: torch counts them
    lengths = [12, 5, 9, 1]
    gene_ids, values, padding, _ = random_tokens(lengths)
    (ids, layout), (vals, _) = (pack_padded(t, padding) for t in (gene_ids, values))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, vals, layout)
    mvc_inner_products = 2 * cfg.d_model * sum(lengths)  # elementwise multiply-and-sum: torch does not count it
    assert counter.get_total_flops() == count_flops(cfg, lengths).forward - mvc_inner_products



def test_work_done_counts_the_pairs_the_generative_mask_computes():
    cfg = tiny_config()  # d 32, 2 layers: 4 d = 128 FLOPs per (query, key) pair per layer, 256 over both
    # cell 1: 6 tokens, 2 generated (k = 4): known x known 16 + generated x (4 known + itself) 2 * 5 = 26 pairs
    # cell 2: 3 tokens, none generated: 9 pairs; model FLOPs count the dense blocks, 36 + 9 = 45 pairs
    count = count_flops(cfg, [6, 3], generated=[2, 0])
    assert count.attention == 256 * 45
    assert count.attention_work_done == 256 * 35
    assert count.forward == 9 * 43200 + 256 * 45
    assert count.forward_work_done == 9 * 43200 + 256 * 35
    assert count.training_step_work_done == 3 * (9 * 43200 + 256 * 35)
    plain = count_flops(cfg, [6, 3])  # no generated tokens: both figures are the model FLOPs
    assert plain.forward_work_done == plain.forward == count.forward


def test_attended_pairs_equal_the_keys_the_mask_allows():
    _, _, padding, gen = random_tokens([9, 4, 12, 1], seed=2, gen_share=0.5)
    allowed = allowed_keys(padding, gen, padding.shape[1], "cpu")[:, 0] & ~padding[:, :, None]  # (B, L, L) real queries
    lengths = (~padding).sum(1)
    assert attended_pairs(lengths, generated_per_cell(gen)) == allowed.sum().item()
    assert attended_pairs(lengths, None) == (lengths ** 2).sum().item()


def test_generated_per_cell_is_the_same_padded_and_packed():
    _, _, padding, gen = random_tokens([7, 2, 5], seed=4, gen_share=0.5)
    packed_gen, layout = pack_padded(gen, padding)
    expected = gen.sum(1)
    assert torch.equal(generated_per_cell(gen), expected)
    assert torch.equal(generated_per_cell(packed_gen, layout), expected)
    known_first = TokenLayout(cu_known=cumulative((~padding & ~gen).sum(1)), cu_gen=cumulative(expected))
    first_gen = torch.cat([gen[~padding & ~gen], gen[gen]])  # (T,) every known token, then every generated one
    assert torch.equal(generated_per_cell(first_gen, known_first), expected)
    assert generated_per_cell(None) is None

def test_padding_does_not_change_the_count():
    cfg = tiny_config()
    _, _, padding, _ = random_tokens([7, 2, 4])
    assert count_flops(cfg, (~padding).sum(1)).forward == count_flops(cfg, [7, 2, 4]).forward


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_peak_table(name, peak):
    assert peak_tflops(name, "bf16-mixed") == peak


def test_peak_is_unknown_outside_bf16_and_mfu_needs_a_peak():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "32-true") is None
    assert mfu(1e12, 1.0, None) is None
    assert mfu(500e12, 1.0, 1000.0) == pytest.approx(0.5)
    assert mfu(500e12, 1.0, 1000.0, n_devices=2) == pytest.approx(0.25)


def _one_monitored_step(cfg, peak: float | None, batch) -> tuple[object, dict]:
    """A CellThroughputMonitor around one training step of ``batch``; -> (monitor, what it logged)."""
    from types import SimpleNamespace

    from scgpt.tasks.callbacks import CellThroughputMonitor

    logged = {}
    module = SimpleNamespace(model=SimpleNamespace(cfg=cfg), device=torch.device("cpu"), peak_tflops=peak,
                             log_dict=lambda values, **_: logged.update(values))
    trainer = SimpleNamespace(world_size=1, precision="32-true")
    monitor = CellThroughputMonitor()
    monitor.on_train_batch_start(trainer, module, batch, 0)
    monitor.on_train_batch_end(trainer, module, None, batch, 0)
    return monitor, logged


def _padded_batch(lengths: list[int]):
    from types import SimpleNamespace

    from scgpt.model import TokenLayout

    _, _, padding, _ = random_tokens(lengths)
    return SimpleNamespace(layout=TokenLayout(padding_mask=padding), n_cells=len(lengths), n_tokens=sum(lengths))


def test_throughput_monitor_logs_tflops_and_mfu_with_a_configured_peak():
    cfg = tiny_config()
    monitor, logged = _one_monitored_step(cfg, 0.001, _padded_batch([7, 2, 4]))
    flops = count_flops(cfg, [7, 2, 4]).training_step
    assert monitor.flops == flops
    assert logged["throughput/tflops_per_device"] == pytest.approx(flops / monitor.seconds / 1e12)
    assert logged["throughput/mfu"] == pytest.approx(logged["throughput/tflops_per_device"] / 0.001)
    assert monitor.mfu == pytest.approx(monitor.tflops_per_s / 0.001)


def test_throughput_monitor_logs_no_mfu_without_a_known_peak():
    monitor, logged = _one_monitored_step(tiny_config(), None, _padded_batch([3]))
    assert "throughput/mfu" not in logged and logged["throughput/tflops_per_device"] > 0
    assert monitor.mfu is None


def test_throughput_monitor_logs_work_done_below_model_flops_with_generated_tokens():
    from types import SimpleNamespace

    cfg = tiny_config()
    _, _, padding, gen = random_tokens([7, 2, 4], seed=1, gen_share=0.5)
    packed_gen, layout = pack_padded(gen, padding)
    batch = SimpleNamespace(layout=layout, gen_mask=packed_gen, n_cells=3, n_tokens=13)
    monitor, logged = _one_monitored_step(cfg, 0.001, batch)
    count = count_flops(cfg, [7, 2, 4], gen.sum(1))
    assert monitor.flops == count.training_step and monitor.flops_work_done == count.training_step_work_done
    assert monitor.flops_work_done < monitor.flops
    assert logged["throughput/tflops_per_device_work_done"] == pytest.approx(
        count.training_step_work_done / monitor.seconds / 1e12)
    assert logged["throughput/mfu_work_done"] == pytest.approx(logged["throughput/tflops_per_device_work_done"] / 0.001)
    assert monitor.mfu_work_done == pytest.approx(monitor.tflops_per_s_work_done / 0.001)
    # data.layout=packed_known_first: every cell's known tokens, then every cell's generated ones; the same counts
    known_first = TokenLayout(cu_known=cumulative((~padding & ~gen).sum(1)), cu_gen=cumulative(gen.sum(1)))
    batch = SimpleNamespace(layout=known_first, gen_mask=torch.cat([gen[~padding & ~gen], gen[gen]]), n_cells=3,
                            n_tokens=13)
    monitor, _ = _one_monitored_step(cfg, 0.001, batch)
    assert monitor.flops == count.training_step and monitor.flops_work_done == count.training_step_work_done
