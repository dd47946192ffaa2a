"""The cell store: round trip through anndata, block reads, fingerprints, input formats, manifests."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from data_modules.cells import CellTable
import data_modules.codecs as codecs_module
from data_modules.convert import convert_to_store, write_store
from data_modules.store import CellStore, open_dataset, write_manifest
from data_modules.synthetic import make_synthetic_adata
from scgpt.errors import DataError
from scgpt.tokenizer.vocab import GeneVocab


@pytest.fixture(scope="module")
def adata():
    a = make_synthetic_adata(n_cells=300, n_genes=60, n_cell_types=3, n_batches=2, seed=0)
    a.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    return a


@pytest.fixture(scope="module")
def h5ad(adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def store(h5ad, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "cells.zarr"
    convert_to_store([h5ad], out, seed=3)
    return out


def test_anndata_opens_the_store_and_rows_are_the_input_permuted(adata, store):
    back = ad.read_zarr(store)
    rows = back.obs["original_index"].to_numpy()
    assert sorted(rows) == list(range(adata.n_obs))
    assert not np.array_equal(rows, np.arange(adata.n_obs))  # shuffled
    assert sp.issparse(back.X) and back.X.format == "csr" and back.X.dtype == np.float32
    assert (back.X != adata.X[rows]).nnz == 0
    assert list(back.obs_names) == list(adata.obs_names[rows])
    for key in ("cell_type", "batch"):
        assert list(back.obs[key]) == list(adata.obs[key].iloc[rows])
    assert set(back.obs["source"]) == {"cells.h5ad"}
    assert list(back.var_names) == list(adata.var_names)
    assert list(back.var["gene_ids"]) == list(adata.var["gene_ids"])
    assert list(back.var["vocab_id"]) == list(range(adata.n_vars))  # vocabulary built from the input genes
    meta = back.uns["scgpt_store"]
    assert meta["n_cells"] == adata.n_obs and meta["shuffle_seed"] == 3 and meta["nnz"] == adata.X.nnz


def test_arrays_are_sharded_and_compressed(store):
    import zarr

    group = zarr.open_group(str(store), mode="r")
    for name in ("data", "indices", "indptr"):
        array = group["X"][name]
        assert array.shards is not None and array.chunks[0] < array.shards[0]
        codecs = array.metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
        assert any(c["name"] == "blosc" for c in codecs)
    assert group["X/indices"].dtype == np.int32 and group["X/indptr"].dtype == np.int64


def test_read_block_maps_genes_to_the_given_vocabulary(adata, store):
    cs = CellStore(store)
    vocab = GeneVocab.from_genes(["NOT_A_GENE", *adata.var_names[::-2]])  # half the genes, reordered
    table = cs.read_block(40, 90, ["cell_type", "batch"], vocab)
    assert isinstance(table, CellTable) and table.n_cells == 50
    rows = ad.read_zarr(store).obs["original_index"].to_numpy()[40:90]
    expected = np.zeros((50, vocab.size), np.float32)
    ids = vocab.encode(list(adata.var_names))
    expected[:, ids[ids >= 0]] = adata.X[rows].toarray()[:, ids >= 0]
    got = np.zeros_like(expected)
    got[:, table.gene_ids] = table.counts.toarray()
    np.testing.assert_array_equal(got, expected)
    assert set(table.gene_ids) <= set(ids[ids >= 0])
    categories = cs.label_categories("cell_type")
    assert [categories[c] for c in table.labels["cell_type"]] == list(adata.obs["cell_type"].iloc[rows])
    assert table.label_names["batch"] == cs.label_categories("batch") == ["batch_0", "batch_1"]


def test_blocks_cover_the_store_and_read_contiguously(adata, store, monkeypatch):
    cs = CellStore(store)
    vocab = cs.vocab()
    parts = [cs.read_block(a, min(a + 70, cs.n_cells), [], vocab).counts for a in range(0, cs.n_cells, 70)]
    assert (sp.vstack(parts) != ad.read_zarr(store).X).nnz == 0
    calls = []
    original = codecs_module._read_into

    async def recording(pairs):
        calls.extend((array.path, a, b) for array, a, b, _ in pairs)
        await original(pairs)

    monkeypatch.setattr(codecs_module, "_read_into", recording)
    cs.read_block(0, cs.n_cells, [], vocab)
    # the whole block in one slice of each X array (values and indices read together), not per cell
    assert calls == [("X/indptr", 0, cs.n_cells + 1), ("X/data", 0, cs.nnz), ("X/indices", 0, cs.nnz)]


def test_store_opens_lazily_and_pickles(store):
    cs = CellStore(store)
    assert not cs.is_open and cs.n_cells == 300 and cs.fingerprint
    cs.read_counts(0, 5)
    clone = pickle.loads(pickle.dumps(cs))
    assert not clone.is_open and clone.fingerprint == cs.fingerprint
    assert (clone.read_counts(0, 5) != cs.read_counts(0, 5)).nnz == 0


def test_fingerprint_is_stable_and_content_sensitive(adata, h5ad, store, tmp_path):
    again = convert_to_store([h5ad], tmp_path / "again.zarr", seed=3)
    other_seed = convert_to_store([h5ad], tmp_path / "seed.zarr", seed=4)
    changed = adata.copy()
    changed.X = changed.X.copy()
    changed.X.data[0] += 1
    other_content = write_store(changed, tmp_path / "changed.zarr", seed=3)
    fingerprint = CellStore(store).fingerprint
    assert again.fingerprint == fingerprint == CellStore(store).compute_fingerprint()
    assert other_seed.fingerprint != fingerprint and other_content.fingerprint != fingerprint


def test_chunked_conversion_equals_one_chunk(h5ad, store, tmp_path):
    report = convert_to_store([h5ad], tmp_path / "chunked.zarr", seed=3, chunk_cells=37)
    assert report.fingerprint == CellStore(store).fingerprint
    a, b = ad.read_zarr(store), ad.read_zarr(tmp_path / "chunked.zarr")
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)


def _write_10x_h5(path, x: sp.csr_matrix, genes, ids, barcodes):
    # CellRanger v3: CSC genes x barcodes, i.e. the CSR arrays of cells x genes.
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = x.data.astype(np.int32), x.indices, x.indptr
        m["shape"] = np.array([x.shape[1], x.shape[0]])
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["features/name"] = np.array(genes, dtype="S")
        m["features/id"] = np.array(ids, dtype="S")
        m["features/feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")


def test_10x_mtx_and_csv_inputs_give_the_same_matrix(adata, store, tmp_path):
    x = sp.csr_matrix(adata.X)
    genes, ids, barcodes = list(adata.var_names), list(adata.var["gene_ids"]), list(adata.obs_names)
    _write_10x_h5(tmp_path / "filtered.h5", x, genes, ids, barcodes)
    mtx = tmp_path / "mtx"
    mtx.mkdir()
    scipy.io.mmwrite(mtx / "matrix.mtx", x.T.astype(np.int64))
    pd.DataFrame({"id": ids, "name": genes, "type": "Gene Expression"}).to_csv(
        mtx / "features.tsv", sep="\t", header=False, index=False)
    (mtx / "barcodes.tsv").write_text("\n".join(barcodes) + "\n")
    pd.DataFrame(x.toarray().astype(int), index=barcodes, columns=genes).to_csv(tmp_path / "cells.csv")
    pd.DataFrame(x.toarray().astype(int), index=barcodes, columns=genes).to_csv(tmp_path / "cells.tsv", sep="\t")
    expected = ad.read_zarr(store)
    for name in ("filtered.h5", "mtx", "cells.csv", "cells.tsv"):
        report = convert_to_store([tmp_path / name], tmp_path / f"{name}.zarr", seed=3, chunk_cells=128)
        assert report.fingerprint == CellStore(store).fingerprint, name
        back = ad.read_zarr(tmp_path / f"{name}.zarr")
        assert (back.X != expected.X).nnz == 0 and list(back.obs_names) == list(expected.obs_names)
        if name != "cells.csv" and name != "cells.tsv":
            assert list(back.var["gene_ids"]) == ids


def test_several_inputs_union_genes_and_keep_sources(adata, tmp_path):
    first, second = adata[:100, :40].copy(), adata[100:180, 20:].copy()
    first.write_h5ad(tmp_path / "a.h5ad")
    second.write_h5ad(tmp_path / "b.h5ad")
    convert_to_store([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "ab.zarr")
    back = ad.read_zarr(tmp_path / "ab.zarr")
    assert list(back.var_names) == list(adata.var_names)
    dropped = int((np.diff(first.X.indptr) == 0).sum() + (np.diff(second.X.indptr) == 0).sum())
    assert back.n_obs == 180 - dropped
    for src, part in (("a.h5ad", first), ("b.h5ad", second)):
        sel = (back.obs["source"] == src).to_numpy()
        rows = back.obs["original_index"].to_numpy()[sel]
        got = back[sel, list(part.var_names)].X
        assert (sp.csr_matrix(got) != part.X[rows]).nnz == 0


def test_manifest_of_two_stores_opens_two_stores(store, h5ad, tmp_path):
    second = tmp_path / "stores" / "second.zarr"
    convert_to_store([h5ad], second, seed=9)
    manifest = tmp_path / "stores" / "dataset.json"
    write_manifest(manifest, [second, store])
    stores = open_dataset(manifest)
    assert [s.path.resolve() for s in stores] == [second.resolve(), store.resolve()]
    assert json.loads(manifest.read_text())["stores"][0] == "second.zarr"
    yaml_manifest = tmp_path / "stores" / "dataset.yaml"
    yaml_manifest.write_text(f"stores:\n  - second.zarr\n  - {store}\n")
    assert [s.fingerprint for s in open_dataset(yaml_manifest)] == [s.fingerprint for s in stores]
    assert len(open_dataset([store, second])) == 2


def test_not_a_store_is_a_data_error(tmp_path, h5ad):
    with pytest.raises(DataError, match="not found"):
        CellStore(tmp_path / "missing.zarr")
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(DataError, match="not a scgpt store"):
        CellStore(tmp_path / "plain.zarr")
    bad_manifest = tmp_path / "m.json"
    bad_manifest.write_text("{}")
    with pytest.raises(DataError, match="m.json"):
        open_dataset(bad_manifest)


def test_store_writes_with_pandas_3_string_inference(tmp_path):
    """pandas >= 3 infers a nullable string dtype for every string column and index, which anndata refuses
    to write by default; the store writer opts in, and the store reads back the same cells."""
    adata = make_synthetic_adata(n_cells=60, n_genes=40, n_cell_types=2, n_batches=2, seed=3)
    with pd.option_context("future.infer_string", True):
        inferred = pd.DataFrame({"name": ["a"]})["name"].dtype
        assert inferred != object  # the pandas 3 behaviour is on
        write_store(adata, tmp_path / "s.zarr")
    back = ad.read_zarr(tmp_path / "s.zarr")
    order = back.obs_names.get_indexer(adata.obs_names)
    np.testing.assert_array_equal(back.X[order].toarray(), adata.X.toarray())
    assert list(back.obs["cell_type"].astype(str)[order]) == list(adata.obs["cell_type"].astype(str))
