"""The long-context evaluation: long-range gain probe, passkey scoring, needle.py.

Known-answer cases: an n-gram copy scorer (predicts a token perfectly when the bigram ending in it occurred
earlier in the sequence, else uniformly over the vocabulary) against a context-ignoring scorer (the loss of a
token depends on that token only). HF paths run on a tiny randomly initialised Llama built here.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nextlong.evaluation import longrange, passkey

ROOT = Path(__file__).resolve().parents[1]
V = 1000
LOG_V = math.log(V)


def copy_scorer(batch):
    """loss[i] = 0 when the bigram (t[i], t[i+1]) occurred before position i, else log V."""
    out = []
    for t in batch:
        t = np.asarray(t)
        seen: set[tuple[int, int]] = set()
        loss = np.empty(len(t) - 1)
        for i in range(len(t) - 1):
            bg = (int(t[i]), int(t[i + 1]))
            loss[i] = 0.0 if bg in seen else LOG_V
            seen.add(bg)
        out.append(loss)
    return out


def context_free_scorer(batch):
    """loss[i] depends on the predicted token only (a unigram model)."""
    return [1.0 + (np.asarray(t[1:]) % 7) / 7.0 for t in batch]


def constructed_docs(n_docs: int = 6, p: int = 4, phrase: int = 20, seed: int = 0) -> list[longrange.ProbeDoc]:
    """Document k repeats one phrase (tokens only it uses) as each of its p meta-chunks; between them sit
    negatives of 37..180 random tokens drawn from a range no phrase uses."""
    rng = np.random.default_rng(seed)
    docs = []
    for k in range(n_docs):
        words = 500 + k * phrase + rng.permutation(phrase)
        toks, metas = [1], []
        for _ in range(p):
            metas.append((len(toks), phrase))
            toks.extend(words.tolist())
            toks.extend(rng.integers(2, 500, size=int(rng.integers(37, 181))).tolist())
        docs.append(longrange.ProbeDoc(f"c:{k}", np.asarray(toks, dtype=np.int64), metas))
    return docs


def test_copy_scorer_gain_is_known():
    docs = constructed_docs()
    rows = longrange.score_docs(docs, copy_scorer, seed=3, batch_size=5)
    assert len(rows) == 6 * 3
    for r in rows:
        # intact: every bigram inside the phrase occurred in meta-chunk 1; only the first token (after a
        # negative) is new. Replaced: the earlier phrases are other documents' tokens, so nothing repeats.
        assert r["loss_intact"] == pytest.approx(LOG_V / 20)
        assert r["loss_replaced"] == pytest.approx(LOG_V)
        assert r["gain"] == pytest.approx(LOG_V * 19 / 20)
        assert 37 <= r["distance"] <= 180
    s = longrange.summarize(rows)
    assert s["documents"] == 6 and s["meta_chunks"] == 18
    assert s["gain"] == pytest.approx(LOG_V * 19 / 20)
    assert s["gain_ci_low"] == pytest.approx(s["gain"]) and s["gain_ci_high"] == pytest.approx(s["gain"])
    assert sum(b["meta_chunks"] for b in s["buckets"]) == 18


def test_context_free_scorer_gains_nothing():
    docs = constructed_docs(seed=1)
    rows = longrange.score_docs(docs, context_free_scorer, seed=4)
    assert all(r["gain"] == 0.0 for r in rows)
    s = longrange.summarize(rows)
    assert s["gain"] == 0.0 and s["loss_intact"] == s["loss_replaced"]


def test_corruption_touches_only_meta_chunks_and_uses_other_documents():
    docs = constructed_docs(seed=2)
    corrupt = longrange.corrupted_tokens(docs, seed=5)
    for d, c in zip(docs, corrupt, strict=True):
        keep = np.ones(len(d.tokens), bool)
        for s, n in d.metas:
            keep[s : s + n] = False
            own = set(d.tokens[s : s + n].tolist())
            assert not own & set(c[s : s + n].tolist()), "a filler must come from another document"
            assert all(500 <= t < 500 + 6 * 20 for t in c[s : s + n])
        np.testing.assert_array_equal(c[keep], d.tokens[keep])
    assert [c.tolist() for c in corrupt] == [c.tolist() for c in longrange.corrupted_tokens(docs, seed=5)]


def test_mean_ci_matches_student_t():
    v = np.array([1.0, 2.0, 4.0, 7.0])
    m, lo, hi = longrange.mean_ci(v)
    half = 3.182446305284263 * v.std(ddof=1) / 2  # t(0.975, 3)
    assert (m, lo, hi) == pytest.approx((3.5, 3.5 - half, 3.5 + half))


def test_probe_docs_from_a_real_nextlong_dataset(tmp_path, docs_corpus, small_tokenizer_json):
    from nextlong.indexed import read_indexed

    prefix = tmp_path / "ev"
    subprocess.run([sys.executable, str(ROOT / "preprocessing" / "make_nextlong_bin.py"), "--input", str(docs_corpus),
                    "--tokenizer", str(small_tokenizer_json), "--target-length", "1024", "--granularity", "256",
                    "--candidates", "16", "--max-samples", "12", "--no-progress", "--no-verify",
                    "--output-prefix", str(prefix)], check=True, capture_output=True)
    docs = longrange.load_probe_docs(prefix, "pd", max_docs=5)
    text = read_indexed(f"{prefix}_text_document")
    assert 1 <= len(docs) <= 5
    for d in docs:
        k = int(d.key.split(":")[1])
        np.testing.assert_array_equal(d.tokens, np.asarray(text[k]))
        assert len(d.metas) >= 2 and all(b[0] > a[0] + a[1] for a, b in zip(d.metas[:-1], d.metas[1:], strict=True))
    rows = longrange.score_docs(docs, copy_scorer, seed=0)
    assert len(rows) == sum(len(d.metas) - 1 for d in docs)
    import pyarrow.parquet as pq

    spans = pq.read_table(f"{prefix}_spans.parquet").to_pandas()
    sel = (spans["sample"] == int(docs[0].key.split(":")[1])) & (spans["role"] == "meta")
    first = str(spans[sel]["doc_id"].iloc[0])
    kept = longrange.load_probe_docs(prefix, "pd", max_docs=5, exclude_doc_ids={first})
    assert docs[0].key not in {d.key for d in kept} and docs[1].key == kept[0].key
    assert all(r["distance"] > 0 for r in rows), "NExtLong samples have negatives between meta-chunks"


# ---------------------------------------------------------------------------------------------------------
# passkey
# ---------------------------------------------------------------------------------------------------------

def _encoder(tokenizer_json: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return lambda text: tok.encode(text, add_special_tokens=False).ids, tok.get_vocab_size()


def copy_logits_fn(vocab: int):
    """Logits of an exact-match copier: at position i, find the earlier position whose preceding tokens match
    the longest suffix ending at i and predict the token that followed it (uniform when none)."""
    import torch

    def fn(batch):
        n = max(len(t) for t in batch)
        out = torch.zeros((len(batch), n, vocab))
        for r, t in enumerate(batch):
            t = list(map(int, t))
            for i in range(len(t)):
                best, nxt = 0, None
                for k in range(i):
                    m = 0
                    while m <= k and t[k - m] == t[i - m]:
                        m += 1
                    if m > best:
                        best, nxt = m, t[k + 1]
                if nxt is not None:
                    out[r, i, nxt] = 10.0
        return out

    return fn


def test_passkey_prompts_lengths_and_depths(small_tokenizer_json):
    encode, _ = _encoder(small_tokenizer_json)
    hay = np.asarray(encode(passkey.FILLER * 10), dtype=np.int64)
    prompts = passkey.build_prompts(encode, hay, [128, 256], [0.0, 0.5, 1.0], trials=2, seed=1, bos=0)
    assert len(prompts) == 12
    for p in prompts:
        assert len(p.tokens) == p.length and p.tokens[0] == 0
        needle = encode(passkey.NEEDLE.format(key=p.key))
        at = next(i for i in range(len(p.tokens)) if p.tokens[i : i + len(needle)].tolist() == needle)
        hay_len = p.length - 1 - len(needle) - len(encode(passkey.QUESTION)) - len(encode(" " + p.key))
        assert at - 1 == round(p.depth * hay_len)
        assert p.tokens[p.key_start :].tolist() == encode(" " + p.key)


def test_passkey_copier_retrieves_context_free_model_does_not(small_tokenizer_json):
    import torch

    encode, vocab = _encoder(small_tokenizer_json)
    hay = np.asarray(encode(passkey.FILLER * 4), dtype=np.int64)
    prompts = passkey.build_prompts(encode, hay, [96, 160], [0.0, 0.5, 1.0], trials=2, seed=2)
    good = passkey.grid(passkey.score_prompts(prompts, copy_logits_fn(vocab), batch_size=3))
    assert all(c["accuracy"] == 1.0 for c in good.values())

    def unigram(batch):
        return torch.zeros((len(batch), max(len(t) for t in batch), vocab))

    bad = passkey.score_prompts(prompts, unigram)
    assert not any(r["exact"] for r in bad)
    assert all(r["key_logprob"] == pytest.approx(-math.log(vocab)) for r in bad)


# ---------------------------------------------------------------------------------------------------------
# HF models: a tiny random Llama
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, small_tokenizer_json) -> Path:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = Tokenizer.from_file(str(small_tokenizer_json)).get_vocab_size()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=0, eos_token_id=1)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    shutil.copy(small_tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "bos_token": "<s>", "eos_token": "</s>"}))
    return out


def test_hf_scorer_batches_equal_single_sequences(tiny_llama):
    import torch
    from nextlong.evaluation.scoring import HFScorer, load_causal_lm

    model, tok = load_causal_lm(tiny_llama, device="cpu")
    assert tok is not None
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 4000, size=n) for n in (50, 17, 33, 50, 2)]
    batched = HFScorer(model, max_batch_tokens=120)(seqs)  # several padded batches
    for t, got in zip(seqs, batched, strict=True):
        with torch.inference_mode():
            logits = model(input_ids=torch.as_tensor(t)[None]).logits[0].float()
        want = torch.nn.functional.cross_entropy(logits[:-1], torch.as_tensor(t[1:]), reduction="none").numpy()
        assert got.shape == (len(t) - 1,)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_probe_on_hf_model(tiny_llama):
    from nextlong.evaluation.scoring import HFScorer, load_causal_lm

    model, _ = load_causal_lm(tiny_llama, device="cpu")
    docs = constructed_docs(n_docs=3, p=3)
    rows = longrange.score_docs(docs, HFScorer(model), seed=0)
    s = longrange.summarize(rows)
    assert len(rows) == 6 and np.isfinite(s["gain"])
    assert s["loss_intact"] == pytest.approx(math.log(4000), rel=0.1)  # an untrained model is near uniform


def test_needle_on_tiny_llama(tiny_llama, tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    import needle

    out = tmp_path / "needle"
    rc = needle.main(["--model", str(tiny_llama), "--out", str(out), "--lengths", "64", "128", "--depths", "0", "0.5",
                      "1", "--trials", "2", "--batch-size", "3", "--device", "cpu"])
    assert rc == 0
    with open(out / "needle.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["length"]), float(r["depth"])) for r in rows] == [(L, d) for L in (64, 128) for d in (0, 0.5, 1)]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["trials"]) == 2
        assert -math.log(4000) * 3 < float(r["key_logprob"]) < 0
    assert (out / "needle.png").stat().st_size > 1000


def test_needle_bad_input_exit_2(tiny_llama, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    import needle

    assert needle.main(["--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert needle.main(["--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--depths", "1.5"]) == 2
    assert "--depths: 1.5" in capsys.readouterr().err
    bad = tmp_path / "hay.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    assert needle.main(["--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--haystack", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
