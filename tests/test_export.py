"""Export (native safetensors, original scGPT directory), import of every source, strict loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scgpt.checkpoints import (load_pretrained, load_state_dict_strict, read_checkpoint, read_deepspeed_checkpoint,
                               vocab_overlap_report)
from scgpt.config import ModelConfig
from scgpt.errors import CheckpointError
from scgpt.export import export, main, original_state_dict
from scgpt.model.layout import TokenLayout
from scgpt.model.scgpt import ScGPTModel
from scgpt.tokenizer.vocab import GeneVocab

GENES = [f"GENE{i}" for i in range(40)]
TOKENIZER = {"n_bins": 51, "max_seq_len": 32, "pad_value": -2.0, "mask_value": -1.0, "include_zero_genes": False}


def small_model(vocab: GeneVocab, seed: int = 0, **overrides) -> ScGPTModel:
    settings = dict(vocab_size=vocab.size, pad_token_id=vocab.pad_id, d_model=32, n_heads=4, n_layers=2, d_hid=64,
                    dropout=0.0, max_seq_len=32)
    torch.manual_seed(seed)
    return ScGPTModel(ModelConfig(**{**settings, **overrides})).eval()


def write_lightning_checkpoint(path: Path, model: ScGPTModel, vocab: GeneVocab | None, **extra) -> Path:
    scgpt_state = {"cells_seen": 64, "attention_backend": "sdpa", "tokenizer": TOKENIZER, "data_fingerprint": "fp123"}
    if vocab is not None:
        scgpt_state["vocab"] = vocab.token_to_id
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 7,
                  "epoch": 1, "hyper_parameters": {"model": model.cfg.to_dict(), "objectives": {"gep": 1.0}},
                  "scgpt": scgpt_state, **extra}
    torch.save(checkpoint, path)
    return path


def outputs(model: ScGPTModel, vocab: GeneVocab):
    g = torch.Generator().manual_seed(1)
    gene_ids = torch.randint(0, len(GENES), (3, 10), generator=g)
    gene_ids[:, 0] = vocab.cls_id
    values = torch.randint(0, 51, (3, 10), generator=g).float()
    values[:, 0] = -2.0
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 7:] = True
    gene_ids = gene_ids.masked_fill(padding, vocab.pad_id)
    with torch.no_grad():
        return model(gene_ids, values, TokenLayout(padding_mask=padding))


def assert_same_outputs(a, b, classifier: bool = False) -> None:
    for name in ("token_states", "cell_emb", "expr_pred", "mvc_pred") + (("cls_logits",) if classifier else ()):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def to_original_names(state: dict, layout: str) -> dict:
    """The original scGPT key names, written out here independently of the exporter's rename table."""
    out = {}
    for key, value in state.items():
        key = key.replace("embedding.encoder.", "encoder.", 1) if key.startswith("embedding.encoder.") else key
        key = key.replace("embedding.value_encoder.", "value_encoder.", 1)
        if layout == "Wqkv":
            key = key.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight")
            key = key.replace("self_attn.in_proj_bias", "self_attn.Wqkv.bias")
        out[key] = value
    return out


@pytest.fixture
def vocab() -> GeneVocab:
    return GeneVocab.from_genes(GENES)


@pytest.fixture
def ckpt(tmp_path, vocab) -> tuple[Path, ScGPTModel]:
    model = small_model(vocab)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"global_step": 7, "val": {"loss": 1.25, "pearson": 0.5}}))
    return write_lightning_checkpoint(run / "checkpoints" / "last.ckpt", model, vocab), model


def assert_cli_fails(argv, capsys, needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert needle in err, err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---- native ------------------------------------------------------------------------------------
def test_native_export_then_import_gives_identical_outputs(ckpt, vocab, tmp_path):
    path, model = ckpt
    out = tmp_path / "native"
    assert main([str(path), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checksums.sha256", "config.json",
                                                     "model.safetensors", "vocab.json"]
    loaded, loaded_vocab, tokenizer = load_pretrained(out)
    assert loaded_vocab == vocab
    assert_same_outputs(outputs(model, vocab), outputs(loaded, vocab))
    assert {k: tokenizer[k] for k in TOKENIZER} == TOKENIZER
    assert tokenizer["pad_token_id"] == vocab.pad_id and tokenizer["cls_token_id"] == vocab.cls_id
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == model.cfg.to_dict() and config["metadata"]["global_step"] == 7
    card = (out / "README.md").read_text()
    assert "fp123" in card and "| global step | 7 |" in card and "loss 1.25" in card and "scgpt-export" in card
    listed = dict(reversed(line.split("  ")) for line in (out / "checksums.sha256").read_text().splitlines())
    assert sorted(listed) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    assert leftovers(tmp_path) == []


def test_lightning_checkpoint_imports_directly(ckpt, vocab):
    path, model = ckpt
    loaded, _, tokenizer = load_pretrained(path)
    assert_same_outputs(outputs(model, vocab), outputs(loaded, vocab))
    assert tokenizer["max_seq_len"] == 32


def test_package_api_load(ckpt, vocab, tmp_path):
    import scgpt

    if getattr(scgpt, "__file__", None) is None:
        pytest.skip("scgpt is imported as a namespace package (stale editable install: pip install -e .)")
    path, model = ckpt
    loaded, tokenizer = scgpt.load(path)
    assert tokenizer.vocab == vocab and tokenizer.collator().cfg.mask_ratios == (0.0,)
    assert_same_outputs(outputs(model, vocab), outputs(loaded, vocab))


# ---- original scGPT format ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["in_proj", "Wqkv"])
def test_scgpt_export_then_import_gives_identical_outputs(ckpt, vocab, tmp_path, layout):
    path, model = ckpt
    out = tmp_path / "orig"
    assert main([str(path), "-o", str(out), "--format", "scgpt", "--qkv-layout", layout]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "best_model.pt", "vocab.json"]
    args = json.loads((out / "args.json").read_text())
    shape = (args["embsize"], args["nheads"], args["d_hid"], args["nlayers"], args["pad_token"])
    assert shape == (32, 4, 64, 2, "<pad>")
    assert args["input_emb_style"] == "continuous" and args["n_bins"] == 51 and args["MVC"] is True
    state = torch.load(out / "best_model.pt", weights_only=True)
    expected = to_original_names(model.state_dict(), layout)
    assert set(state) - set(expected) == {k for k in state if k.startswith("cls_decoder.")}  # added, one class
    assert state["cls_decoder.out_layer.weight"].shape == (1, 32)
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    loaded, loaded_vocab, _ = load_pretrained(out)
    assert loaded_vocab == vocab and loaded.cfg.n_cls_classes == 1
    assert_same_outputs(outputs(model, vocab), outputs(loaded, vocab))


@pytest.mark.parametrize("layout", ["in_proj", "Wqkv"])
def test_original_directory_imports_with_identical_outputs(vocab, tmp_path, layout):
    model = small_model(vocab, n_cls_classes=3)
    out = tmp_path / "scgpt_model"
    out.mkdir()
    torch.save(to_original_names(model.state_dict(), layout), out / "best_model.pt")
    vocab.save(out / "vocab.json")
    (out / "args.json").write_text(json.dumps({"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2,
                                               "n_layers_cls": 3, "dropout": 0.0, "pad_token": "<pad>",
                                               "pad_value": -2, "MVC": True, "max_seq_len": 32}))
    loaded, _, tokenizer = load_pretrained(out)
    assert loaded.cfg.n_cls_classes == 3 and loaded.cfg.n_bins == 51 and tokenizer["max_seq_len"] == 32
    assert_same_outputs(outputs(model, vocab), outputs(loaded, vocab), classifier=True)


def whole_human_spec_keys(n_layers: int = 12, d: int = 512, d_hid: int = 512, ntoken: int = 60697,
                          explicit_zero_prob: bool = False) -> dict[str, tuple[int, ...]]:
    """The state-dict list of shared/specs/scgpt-format.md, written out."""
    keys = {"encoder.embedding.weight": (ntoken, d), "encoder.enc_norm.weight": (d,), "encoder.enc_norm.bias": (d,),
            "value_encoder.linear1.weight": (d, 1), "value_encoder.linear1.bias": (d,),
            "value_encoder.linear2.weight": (d, d), "value_encoder.linear2.bias": (d,),
            "value_encoder.norm.weight": (d,), "value_encoder.norm.bias": (d,)}
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}."
        keys.update({p + "self_attn.in_proj_weight": (3 * d, d), p + "self_attn.in_proj_bias": (3 * d,),
                     p + "self_attn.out_proj.weight": (d, d), p + "self_attn.out_proj.bias": (d,),
                     p + "linear1.weight": (d_hid, d), p + "linear1.bias": (d_hid,),
                     p + "linear2.weight": (d, d_hid), p + "linear2.bias": (d,),
                     p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                     p + "norm2.weight": (d,), p + "norm2.bias": (d,)})
    heads = ["decoder.fc"] + (["decoder.zero_logit"] if explicit_zero_prob else [])
    for head in heads:
        keys.update({f"{head}.0.weight": (d, d), f"{head}.0.bias": (d,), f"{head}.2.weight": (d, d),
                     f"{head}.2.bias": (d,), f"{head}.4.weight": (1, d), f"{head}.4.bias": (1,)})
    for i in (0, 3):  # cls_decoder._decoder.{0,2,3,5}: (Linear, ReLU, LayerNorm) x 2
        keys.update({f"cls_decoder._decoder.{i}.weight": (d, d), f"cls_decoder._decoder.{i}.bias": (d,),
                     f"cls_decoder._decoder.{i + 2}.weight": (d,), f"cls_decoder._decoder.{i + 2}.bias": (d,)})
    keys.update({"cls_decoder.out_layer.weight": (1, d), "cls_decoder.out_layer.bias": (1,),
                 "mvc_decoder.gene2query.weight": (d, d), "mvc_decoder.gene2query.bias": (d,),
                 "mvc_decoder.W.weight": (d, d)})
    if explicit_zero_prob:
        keys.update({"mvc_decoder.W_zero_logit.weight": (d, d), "mvc_decoder.W_zero_logit.bias": (d,)})
    return keys


@pytest.mark.parametrize("explicit_zero_prob", [False, True])
def test_whole_human_scgpt_export_matches_spec_keys_and_shapes(explicit_zero_prob):
    with torch.device("meta"):
        model = ScGPTModel(ModelConfig(vocab_size=60697, pad_token_id=60694, explicit_zero_prob=explicit_zero_prob))
    state = original_state_dict(model)
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == whole_human_spec_keys(explicit_zero_prob=explicit_zero_prob)
    flash = original_state_dict(model, "Wqkv")
    assert "transformer_encoder.layers.11.self_attn.Wqkv.weight" in flash and len(flash) == len(state)


@pytest.mark.parametrize("option, value", [("norm_scheme", "pre"), ("value_encoding", "category"),
                                           ("n_batch_labels", 2), ("n_modalities", 2), ("n_perturbation_flags", 3)])
def test_scgpt_format_refuses_unsupported_architectures(vocab, tmp_path, capsys, option, value):
    path = write_lightning_checkpoint(tmp_path / "x.ckpt", small_model(vocab, **{option: value}), vocab)
    out = tmp_path / "orig"
    assert_cli_fails([str(path), "-o", str(out), "--format", "scgpt"], capsys, f"model.{option}={value}")
    assert not out.exists() and leftovers(tmp_path) == []
    assert main([str(path), "-o", str(tmp_path / "native")]) == 0  # native takes every architecture


# ---- strict loading and bad files ----------------------------------------------------------------
def test_strict_loading_reports_missing_unexpected_and_mismatched(vocab):
    model = small_model(vocab)
    state = dict(model.state_dict())
    del state["decoder.fc.4.bias"]
    state["transformer_encoder.final_norm.weight"] = torch.ones(32)
    state["embedding.encoder.embedding.weight"] = torch.zeros(99, 32)
    with pytest.raises(CheckpointError) as exc:
        load_state_dict_strict(small_model(vocab), state, "some.ckpt")
    message = str(exc.value)
    assert message.startswith("some.ckpt:")
    assert "1 missing (decoder.fc.4.bias)" in message
    assert "1 unexpected (transformer_encoder.final_norm.weight)" in message
    assert "embedding.encoder.embedding.weight (99, 32) != model (43, 32)" in message


def test_strict_loading_skip_prefixes_keeps_a_new_classifier(vocab):
    source = small_model(vocab, n_cls_classes=1)
    target = small_model(vocab, seed=5, n_cls_classes=4)
    head = target.cls_decoder.out_layer.weight.clone()
    load_state_dict_strict(target, source.state_dict(), "pretrained", skip_prefixes=("cls_decoder.",))
    assert torch.equal(target.cls_decoder.out_layer.weight, head)
    assert torch.equal(target.decoder.fc[0].weight, source.decoder.fc[0].weight)


def test_corrupt_and_truncated_files_are_clear_errors(ckpt, vocab, tmp_path):
    path, _ = ckpt
    data = path.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=str(bad)):
            read_checkpoint(bad)
    native = tmp_path / "native"
    export(path, native)
    weights = native / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="checksum does not match"):
        read_checkpoint(native)
    (native / "checksums.sha256").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read"):
        read_checkpoint(native)
    orig = tmp_path / "orig"
    export(path, orig, fmt="scgpt")
    (orig / "best_model.pt").write_bytes((orig / "best_model.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="best_model.pt: cannot be read"):
        read_checkpoint(orig)


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": print}, evil)  # a callable: not allowed by weights_only
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        read_checkpoint(evil)


def test_vocabulary_comes_from_checkpoint_or_vocab_option(vocab, tmp_path, capsys):
    path = write_lightning_checkpoint(tmp_path / "novocab.ckpt", small_model(vocab), None)
    assert_cli_fails([str(path), "-o", str(tmp_path / "a")], capsys, "--vocab")
    vocab.save(tmp_path / "vocab.json")
    assert main([str(path), "-o", str(tmp_path / "a"), "--vocab", str(tmp_path / "vocab.json")]) == 0
    GeneVocab.from_genes(GENES[:10]).save(tmp_path / "small.json")
    assert_cli_fails([str(path), "-o", str(tmp_path / "b"), "--vocab", str(tmp_path / "small.json")], capsys,
                     "does not match the model")
    assert not (tmp_path / "b").exists()


def test_bad_cli_inputs_exit_2_and_leave_nothing(ckpt, tmp_path, capsys):
    path, _ = ckpt
    assert_cli_fails([str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "o")], capsys, "missing.ckpt")
    assert_cli_fails([str(path), "-o", str(tmp_path / "o"), "--format", "onnx"], capsys, "--format")
    assert_cli_fails([str(path)], capsys, "-o")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_cli_fails([str(empty), "-o", str(tmp_path / "o")], capsys, "not a model directory")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_cli_fails([str(path), "-o", str(existing)], capsys, "--overwrite")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    native = tmp_path / "native"
    assert main([str(path), "-o", str(native)]) == 0
    assert_cli_fails([str(native), "-o", str(native), "--overwrite"], capsys, "is (or contains) the checkpoint")
    assert main([str(path), "-o", str(existing), "--overwrite"]) == 0
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_cli_process_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scgpt.export", str(tmp_path / "nope.ckpt"), "-o",
                             str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_vocab_overlap_report(vocab):
    line = vocab_overlap_report(vocab, ["GENE1", "GENE2", "OTHER"])
    assert line.startswith("2 of 3 genes (66.7%)") and "OTHER" in line


# ---- DeepSpeed ---------------------------------------------------------------------------------
def test_deepspeed_checkpoint_without_deepspeed_names_the_extra(tmp_path):
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    zero = tmp_path / "last.ckpt"
    (zero / "checkpoint").mkdir(parents=True)
    (zero / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match=r"pip install 'scgpt\[deepspeed\]'"):
        read_deepspeed_checkpoint(zero)
    with pytest.raises(CheckpointError, match="scgpt\\[deepspeed\\]"):
        read_checkpoint(zero)


ZERO3_SCRIPT = """
import sys, torch, deepspeed
from scgpt.config import ModelConfig
from scgpt.model.scgpt import ScGPTModel
from scgpt.tokenizer.vocab import GeneVocab

out = sys.argv[1]
vocab = GeneVocab.from_genes([f"GENE{i}" for i in range(40)])
cfg = ModelConfig(vocab_size=vocab.size, pad_token_id=vocab.pad_id, d_model=32, n_heads=4, n_layers=2, d_hid=64,
                  dropout=0.0, max_seq_len=32)

class Task(torch.nn.Module):  # the LightningModule's layout: the model under ``model.``
    def __init__(self):
        super().__init__()
        self.model = ScGPTModel(cfg)

deepspeed.init_distributed(dist_backend="gloo")
config = {"train_batch_size": 1, "zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
with deepspeed.zero.Init(config_dict_or_path=config):
    task = Task()
engine, *_ = deepspeed.initialize(model=task, model_parameters=task.parameters(), config=config)
client = {"hyper_parameters": {"model": cfg.to_dict()}, "global_step": 3, "scgpt": {"vocab": vocab.token_to_id}}
engine.save_checkpoint(out + "/zero.ckpt", tag="checkpoint", client_state=client)  # as Lightning writes it
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out + "/unsharded.pt")
"""


@pytest.mark.slow
def test_zero3_checkpoint_exports_the_unsharded_weights(tmp_path):
    """A ZeRO-3 checkpoint (DeepSpeed on CPU with gloo, one process) consolidates to the gathered weights."""
    pytest.importorskip("deepspeed")
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "native"
    assert main([str(tmp_path / "zero.ckpt"), "-o", str(out)]) == 0
    unsharded = torch.load(tmp_path / "unsharded.pt", weights_only=True)
    loaded, _, _ = load_pretrained(out)
    state = loaded.state_dict()
    assert len(state) == len(unsharded)
    for key, value in state.items():
        assert torch.equal(value, unsharded[f"model.{key}"]), key
