"""Embedders (offline hashing; sentence-transformers with a tiny model built here) and the FAISS index."""

from __future__ import annotations

import numpy as np
import pytest
from nextlong.embedding import HashingEmbedder
from nextlong.index import build_index, load_index, save_index, search

TEXTS = [
    "The mitochondria is the powerhouse of the cell and produces ATP through respiration.",
    "Cellular respiration in mitochondria produces ATP, the energy currency of the cell.",
    "The French Revolution began in 1789 with the storming of the Bastille.",
    "In 1789 the storming of the Bastille started the French Revolution.",
    "Supply and demand determine the market price of goods in an economy.",
]


def test_hashing_embedder_is_deterministic_normalized_and_topical():
    a, b = HashingEmbedder(dim=64, seed=3), HashingEmbedder(dim=64, seed=3)
    a.fit(TEXTS)
    b.fit(TEXTS)
    ea, eb = a.embed(TEXTS), b.embed(TEXTS)
    assert ea.dtype == np.float32 and ea.shape == (5, 64)
    assert ea.tobytes() == eb.tobytes()
    np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, rtol=1e-5)
    sims = ea @ ea.T
    assert sims[0, 1] > max(sims[0, 2], sims[0, 3], sims[0, 4])
    assert sims[2, 3] > max(sims[2, 0], sims[2, 1], sims[2, 4])
    one_pass = HashingEmbedder(dim=64, seed=3).fit_embed(TEXTS)  # the pipeline's single hashing pass
    assert one_pass.tobytes() == ea.tobytes()
    c = HashingEmbedder(dim=64, seed=4)
    c.fit(TEXTS)
    assert c.embed(TEXTS).tobytes() != ea.tobytes()


def test_flat_index_is_exact_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = build_index(x, "Flat")
    sims, ids = search(idx, x[:10], 5)
    ref = np.argsort(-(x[:10] @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, ref)
    save_index(idx, tmp_path / "i.faiss")
    _, ids2 = search(load_index(tmp_path / "i.faiss"), x[:10], 5)
    np.testing.assert_array_equal(ids2, ids)


def test_ivf_index_recall_and_bad_factory():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = build_index(x, "IVF16,Flat", train_size=2000, seed=0, nprobe=16)  # nprobe = all lists: exact
    _, ids = search(idx, x[:20], 10)
    ref = np.argsort(-(x[:20] @ x.T), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref, strict=True)]) == 1.0
    with pytest.raises(ValueError, match="--index-factory"):
        build_index(x, "NotAnIndex")


def test_sentence_transformers_tiny_model_by_path(tmp_path):
    pytest.importorskip("sentence_transformers")
    from nextlong.embedding import make_embedder
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tmodels
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TEXTS * 3, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    bert_dir = tmp_path / "bert"
    cfg = BertConfig(vocab_size=hf_tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(bert_dir)
    hf_tok.save_pretrained(bert_dir)
    st_dir = tmp_path / "st"
    word = models.Transformer(str(bert_dir), max_seq_length=48)
    SentenceTransformer(modules=[word, models.Pooling(32, "mean")], device="cpu").save(str(st_dir))

    emb = make_embedder(str(st_dir), seed=0, batch_size=2)
    assert emb.dim == 32 and emb.describe()["device"] == "cpu"
    out = emb.embed(TEXTS)
    assert out.shape == (5, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-4)
    # length-sorted batching must not change the order of the rows
    np.testing.assert_allclose(emb.embed(TEXTS[::-1])[::-1], out, atol=1e-5)
    with pytest.raises(ValueError, match="--embedder"):
        make_embedder(str(tmp_path / "nothing-here"), seed=0)
