"""GeneVocab: the original scGPT vocab.json layout, without torchtext."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scgpt.errors import DataError
from scgpt.tokenizer.vocab import SPECIAL_TOKENS, GeneVocab

GENES = ["CD3D", "MS4A1", "LYZ", "NKG7"]


def test_save_load_round_trip_keeps_ids(tmp_path):
    vocab = GeneVocab.from_genes(GENES)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = GeneVocab.load(path)
    assert loaded == vocab
    assert loaded.token_to_id == vocab.token_to_id
    assert list(json.loads(path.read_text()).values()) == list(range(len(vocab)))  # sorted by id
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left


def test_specials_appended_after_genes():
    vocab = GeneVocab.from_genes(GENES)
    assert [vocab[g] for g in GENES] == [0, 1, 2, 3]
    assert [vocab[s] for s in SPECIAL_TOKENS] == [4, 5, 6]
    assert (vocab.pad_id, vocab.cls_id, vocab.eoc_id) == (4, 5, 6)
    assert vocab.genes == GENES
    assert len(vocab) == vocab.size == 7
    assert vocab.id_to_token(5) == "<cls>"


def test_load_original_vocab_missing_eoc_appends_it(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"A1BG": 0, "<pad>": 1, "A2M": 2, "<cls>": 3}))
    vocab = GeneVocab.load(path)
    assert vocab["<eoc>"] == 4
    assert vocab["<pad>"] == 1 and vocab["A2M"] == 2
    assert vocab.genes == ["A1BG", "A2M"]
    assert vocab.size == 5


def test_duplicate_genes_rejected_naming_the_gene():
    with pytest.raises(DataError, match="LYZ"):
        GeneVocab.from_genes(["CD3D", "LYZ", "NKG7", "LYZ"])


def test_empty_gene_list_rejected():
    with pytest.raises(DataError):
        GeneVocab.from_genes([])


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", '{"A": "zero"}', '{"A": -1}'])
def test_malformed_json_rejected_naming_the_path(tmp_path, text):
    path = tmp_path / "bad_vocab.json"
    path.write_text(text)
    with pytest.raises(DataError, match="bad_vocab.json"):
        GeneVocab.load(path)


def test_missing_file_rejected_naming_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        GeneVocab.load(tmp_path / "nope.json")


def test_duplicate_ids_rejected():
    with pytest.raises(DataError):
        GeneVocab({"A": 0, "B": 0})


def test_encode_gives_minus_one_for_unknown_genes():
    vocab = GeneVocab.from_genes(GENES)
    ids = vocab.encode(["LYZ", "NOT_A_GENE", "CD3D"])
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [2, -1, 0])
    assert "NOT_A_GENE" not in vocab
    with pytest.raises(KeyError):
        vocab["NOT_A_GENE"]
