"""Cell embeddings: the Python API and scgpt-embed (shape, normalisation, determinism, streaming, bad input)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scgpt.embed import embed, load, main
from scgpt.errors import ConfigError, DataError
from scgpt.export import export
from scgpt.tokenizer.vocab import GeneVocab

GENES = [f"GENE{i}" for i in range(30)]


def _export_tiny_model(root: Path, **model_options) -> Path:
    """A tiny native export (max_seq_len 16, so cells with more genes are sampled)."""
    from scgpt.config import ModelConfig
    from scgpt.model.scgpt import ScGPTModel

    vocab = GeneVocab.from_genes(GENES)
    torch.manual_seed(0)
    model = ScGPTModel(ModelConfig(vocab_size=vocab.size, pad_token_id=vocab.pad_id, d_model=32, n_heads=4,
                                   n_layers=2, d_hid=64, dropout=0.0, max_seq_len=16, **model_options))
    tokenizer = {"n_bins": 51, "max_seq_len": 16, "pad_value": -2.0, "mask_value": -1.0, "include_zero_genes": False}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
                "hyper_parameters": {"model": model.cfg.to_dict()},
                "scgpt": {"vocab": vocab.token_to_id, "tokenizer": tokenizer}}, root / "last.ckpt")
    return export(root / "last.ckpt", root / "model")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _export_tiny_model(tmp_path_factory.mktemp("embed-model"))


def make_adata(n_cells: int = 37, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(n_cells, len(GENES))).astype(np.float32)
    counts[min(3, n_cells - 1)] = 0  # a cell without any expressed gene
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:05d}" for i in range(len(GENES))]}, index=GENES)
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def h5ad(tmp_path) -> Path:
    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)
    return path


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def test_embedding_shape_norm_and_determinism(model_dir):
    adata = make_adata()
    first = embed(adata, model_dir, batch_size=8)
    assert first.shape == (adata.n_obs, 32) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(first).all()
    assert np.array_equal(first, embed(adata, model_dir, batch_size=8))
    assert not np.allclose(first[0], first[1])


def test_embedding_equals_the_model_cls_state(model_dir):
    """One cell with fewer genes than max_seq_len: no sampling, so the tokens are known exactly."""
    from scgpt.model.layout import TokenLayout
    from scgpt.tokenizer.binning import bin_expression

    adata = make_adata(n_cells=1, seed=3)
    adata.X = sp.csr_matrix(np.r_[np.arange(1, 6), np.zeros(len(GENES) - 5)].astype(np.float32)[None])
    model, tokenizer = load(model_dir)
    ids = torch.tensor([[tokenizer.vocab.cls_id] + [tokenizer.vocab[g] for g in GENES[:5]]])
    counts = torch.arange(1, 6, dtype=torch.float32)[None]
    bins = bin_expression(counts, torch.ones_like(counts, dtype=torch.bool), 51)  # distinct values: no ties
    values = torch.cat([torch.tensor([[-2.0]]), bins], dim=1)
    with torch.no_grad():
        _, _, cell = model.encode(ids, values, TokenLayout(padding_mask=torch.zeros(1, 6, dtype=torch.bool)))
    expected = torch.nn.functional.normalize(cell, dim=-1).numpy()
    np.testing.assert_allclose(embed(adata, model_dir), expected, atol=1e-5)  # gene order does not matter


def test_backed_file_and_path_give_the_same_embedding(model_dir, h5ad):
    in_memory = embed(ad.read_h5ad(h5ad), model_dir, batch_size=8)
    assert np.array_equal(embed(ad.read_h5ad(h5ad, backed="r"), model_dir, batch_size=8), in_memory)
    assert np.array_equal(embed(str(h5ad), model_dir, batch_size=8), in_memory)


def test_genes_matched_by_ensembl_ids_or_gene_column(model_dir):
    adata = make_adata()
    reference = embed(adata, model_dir)
    swapped = adata.copy()
    swapped.var = pd.DataFrame({"gene_ids": GENES}, index=[f"ENSG{i:05d}" for i in range(len(GENES))])
    assert np.array_equal(embed(swapped, model_dir), reference)  # gene_ids column matches better
    swapped.var = pd.DataFrame({"symbol": GENES}, index=[f"X{i}" for i in range(len(GENES))])
    assert np.array_equal(embed(swapped, model_dir, gene_column="symbol"), reference)
    with pytest.raises(DataError, match="no column 'nope'"):
        embed(swapped, model_dir, gene_column="nope")
    with pytest.raises(DataError, match="minimum overlap"):
        embed(swapped, model_dir)


def test_package_api_embed(model_dir):
    import scgpt

    if getattr(scgpt, "__file__", None) is None:
        pytest.skip("scgpt is imported as a namespace package (stale editable install: pip install -e .)")
    adata = make_adata()
    assert np.array_equal(scgpt.embed(adata, model_dir, batch_size=8), embed(adata, model_dir, batch_size=8))


def test_cli_writes_obsm_and_keeps_obs_var_x(model_dir, h5ad, tmp_path, capsys):
    out = tmp_path / "out" / "embedded.h5ad"
    code, err = run_cli([h5ad, "--model", model_dir, "-o", out, "--batch-size", 8, "--no-progress"], capsys)
    assert code == 0, err
    assert "30 of 30 genes (100.0%)" in err
    result, source = ad.read_h5ad(out), ad.read_h5ad(h5ad)
    pd.testing.assert_frame_equal(result.obs, source.obs)
    pd.testing.assert_frame_equal(result.var, source.var)
    assert (result.X != source.X).nnz == 0
    assert np.array_equal(result.obsm["X_scgpt"], embed(source, model_dir, batch_size=8))
    assert [p.name for p in out.parent.iterdir()] == ["embedded.h5ad"]


def test_cli_streams_in_chunks_with_the_same_result(model_dir, h5ad, tmp_path, monkeypatch):
    import scgpt.embed as embed_module

    reads = []
    original = embed_module.rows_of_anndata

    def recording(adata, name="adata", layer=None):
        rows = original(adata, name, layer)
        read = rows.read
        rows.read = lambda a, b: reads.append((a, b)) or read(a, b)
        return rows

    monkeypatch.setattr(embed_module, "rows_of_anndata", recording)
    reference = embed(ad.read_h5ad(h5ad), model_dir, batch_size=8)
    reads.clear()
    rows = embed_module.rows_of_anndata(ad.read_h5ad(h5ad, backed="r"), "x")
    model, tokenizer = load(model_dir)
    match = embed_module.match_genes(tokenizer.vocab, rows.var_names, rows.var, None, 0.5, "x")
    blocks = list(embed_module.iter_embeddings(model, tokenizer, rows, match, batch_size=8, chunk_rows=16))
    assert reads == [(0, 16), (16, 32), (32, 37)]
    assert np.array_equal(np.concatenate([b for _, b in blocks]), reference)


def test_umap_is_skipped_cleanly_without_umap_learn(model_dir, h5ad, tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
        import umap  # noqa: F401
        pytest.skip("umap-learn and matplotlib are installed")
    except ImportError:
        pass
    code, err = run_cli([h5ad, "--model", model_dir, "-o", tmp_path / "e.h5ad", "--umap", tmp_path / "u.png",
                         "--no-progress"], capsys)
    assert code == 0 and "skipping --umap" in err
    assert (tmp_path / "e.h5ad").is_file() and not (tmp_path / "u.png").exists()


def test_store_input(model_dir, tmp_path, capsys):
    from data_modules.convert import write_store

    adata = make_adata()
    adata.X = adata.X.tocsr()
    store = tmp_path / "cells.zarr"
    write_store(adata, store, vocab=GeneVocab.from_genes(GENES))
    out = tmp_path / "from_store.h5ad"
    code, err = run_cli([store, "--model", model_dir, "-o", out, "--no-progress"], capsys)
    assert code == 0, err
    result = ad.read_h5ad(out)
    assert result.obsm["X_scgpt"].shape == (result.n_obs, 32) and result.n_vars == len(GENES)
    np.testing.assert_allclose(np.linalg.norm(result.obsm["X_scgpt"], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("case", ["missing_input", "not_h5ad", "bad_model", "exists", "low_overlap", "batch_size",
                                  "gene_column", "device", "same_file", "corrupt_h5ad"])
def test_bad_cli_input_exits_2_with_one_line_and_leaves_nothing(model_dir, h5ad, tmp_path, capsys, case):
    out = tmp_path / "o" / "out.h5ad"
    out.parent.mkdir()
    argv = [h5ad, "--model", model_dir, "-o", out, "--no-progress"]
    if case == "missing_input":
        argv[0] = tmp_path / "missing.h5ad"
    elif case == "not_h5ad":
        argv[0] = tmp_path / "cells.csv"
        argv[0].write_text("a,b\n")
    elif case == "corrupt_h5ad":
        argv[0] = tmp_path / "corrupt.h5ad"
        argv[0].write_bytes(h5ad.read_bytes()[:300])
    elif case == "bad_model":
        argv[2] = tmp_path
    elif case == "exists":
        out.write_text("keep")
    elif case == "low_overlap":
        other = make_adata()
        other.var_names = [f"X{i}" for i in range(len(GENES))]
        other.var = other.var.drop(columns="gene_ids")
        argv[0] = tmp_path / "other.h5ad"
        other.write_h5ad(argv[0])
    elif case == "batch_size":
        argv += ["--batch-size", 0]
    elif case == "gene_column":
        argv += ["--gene-column", "nope"]
    elif case == "device":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available")
        argv += ["--device", "cuda"]
    elif case == "same_file":
        argv[4] = h5ad
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    expected = {"exists": ["out.h5ad"]}.get(case, [])
    assert sorted(p.name for p in out.parent.iterdir()) == expected
    if case == "exists":
        assert out.read_text() == "keep"


def test_cells_without_expressed_genes_get_the_cls_only_embedding(model_dir):
    adata = make_adata(n_cells=5)
    adata.X = sp.csr_matrix((5, len(GENES)), dtype=np.float32)
    result = embed(adata, model_dir, batch_size=2)
    np.testing.assert_allclose(np.linalg.norm(result, axis=1), 1.0, rtol=1e-5)
    assert np.allclose(result, result[0])


def test_models_with_a_modality_embedding_get_modality_ids_from_feature_type(tmp_path):
    """RNA + protein features: each token's modality id comes from var['feature_type'] (as in training),
    and each modality is binned on its own."""
    from data_modules.modality import ADT, N_MODALITY_IDS, RNA, SPECIAL, bin_per_modality
    from scgpt.model.layout import TokenLayout

    model_dir = _export_tiny_model(tmp_path, n_modalities=N_MODALITY_IDS)
    adata = make_adata(n_cells=1, seed=5)
    adata.X = sp.csr_matrix(np.r_[np.arange(1, 7), np.zeros(len(GENES) - 6)].astype(np.float32)[None])
    adata.var["feature_type"] = ["Gene Expression"] * 3 + ["Antibody Capture"] * (len(GENES) - 3)
    model, tokenizer = load(model_dir)
    ids = torch.tensor([[tokenizer.vocab.cls_id] + [tokenizer.vocab[g] for g in GENES[:6]]])
    modality = np.array([[RNA] * 3 + [ADT] * 3])
    counts = np.arange(1, 7, dtype=np.float32)[None]
    bins = bin_per_modality(counts, np.ones_like(counts, dtype=bool), modality, 51, np.zeros_like(counts))
    values = torch.cat([torch.tensor([[-2.0]]), torch.from_numpy(bins)], dim=1)
    modality_ids = torch.tensor([[SPECIAL, *modality[0]]])
    layout = TokenLayout(padding_mask=torch.zeros(1, 7, dtype=torch.bool))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode(ids, values, layout, modality_ids=modality_ids)[2], dim=-1)
        without = torch.nn.functional.normalize(model.encode(ids, values, layout)[2], dim=-1)
    got = embed(adata, model_dir)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)  # token order differs: float sums do too
    assert not np.allclose(got, without.numpy(), atol=1e-2)


def test_a_loaded_model_is_embedded_without_reloading(model_dir, monkeypatch):
    import scgpt.embed as embed_module

    adata = make_adata()
    reference = embed(adata, model_dir, batch_size=8)
    loaded = load(model_dir)
    loaded[0].train()  # left as it came in, but embedded in eval mode (dropout off)

    def no_reload(*args, **kwargs):
        raise AssertionError("a loaded model was loaded again")

    monkeypatch.setattr(embed_module, "load", no_reload)
    for _ in range(2):
        assert np.array_equal(embed(adata, loaded, batch_size=8), reference)
    assert loaded[0].training
    with pytest.raises(ConfigError, match="the \\(model, tokenizer\\) pair scgpt.load returns"):
        embed(adata, loaded[0])


def test_counts_in_a_layer(model_dir):
    adata = make_adata()
    reference = embed(adata, model_dir, batch_size=8)
    layered = adata.copy()
    layered.layers["counts"] = adata.X.copy()
    layered.X = sp.csr_matrix(np.log1p(adata.X.toarray()) * 0 + 1.0)  # X holds something else
    assert np.array_equal(embed(layered, model_dir, batch_size=8, layer="counts"), reference)
    assert not np.array_equal(embed(layered, model_dir, batch_size=8), reference)
    with pytest.raises(DataError, match="no layer 'raw'; available: counts"):
        embed(layered, model_dir, layer="raw")


def test_duplicate_gene_symbols_are_refused_with_one_line_whose_fix_works(model_dir):
    adata = make_adata()
    names = list(GENES)
    names[5] = names[4] = "GENE4"  # two columns for one vocabulary gene
    names[7] = names[8] = "NOTAGENE"  # duplicates outside the vocabulary are ignored anyway
    adata.var_names = names
    with pytest.raises(DataError, match=r"1 genes of the vocabulary name more than one column of var_names "
                                        r"\(e.g. GENE4\).*adata\[:, ~adata.var_names.duplicated\(\)\]") as caught:
        embed(adata, model_dir)
    assert "\n" not in str(caught.value)
    adata = adata[:, ~adata.var_names.duplicated()]  # the fix the message gives
    assert embed(adata, model_dir).shape == (adata.n_obs, 32)
