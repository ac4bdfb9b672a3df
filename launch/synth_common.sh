#!/bin/bash
# Shared body of launch/synth_{128k,512k,64k}.sbatch: one NExtLong dataset of the recipe, as the README's real-usage
# command (FineWeb-Edu + Cosmopedia v2 mixed 1:1, Llama-3 tokenizer, jina-embeddings-v3, IVF index), in three
# splits of a stable hash of the document ids (preprocessing/nextlong/split.py):
#   <OUT>_valid and <OUT>_test: meta-documents and negatives only from the held-out documents,
#   <OUT>: the training set, from the other documents only.
# The three runs (and the three datasets) share one work directory, so chunking, embedding and the FAISS index are
# done once for all of them; submit the datasets one after another (see docs/recipe.md), not at the same time.
# A split whose <prefix>_manifest.json exists is skipped (its run finished); FORCE=1 redoes it. Rerunning a
# killed or requeued job resumes the split that was running from its completed units.
#
# The caller sets TARGET_LENGTH, OUT, TRAIN_SAMPLES, HELDOUT_SAMPLES, then sources this file.
#
# Required environment:
#   NEXTLONG_DATA   output directory (as in configs/neox/site_example*.yml)
#   FINEWEB_EDU     FineWeb-Edu Parquet glob, quoted, e.g. '/corpora/fineweb-edu/sample/10BT/*.parquet'
#   COSMOPEDIA_V2   Cosmopedia v2 Parquet glob, quoted, e.g. '/corpora/smollm-corpus/cosmopedia-v2/*.parquet'
#   TOKENIZER       Meta-Llama-3-8B model directory (or its tokenizer.json)
#   EMBEDDER        local directory of jinaai/jina-embeddings-v3 (the paper's retriever; nothing is downloaded)

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-python}
NEXTLONG_DATA=${NEXTLONG_DATA:?set NEXTLONG_DATA to the output directory}
FINEWEB_EDU=${FINEWEB_EDU:?set FINEWEB_EDU to the FineWeb-Edu Parquet glob (quoted)}
COSMOPEDIA_V2=${COSMOPEDIA_V2:?set COSMOPEDIA_V2 to the Cosmopedia v2 Parquet glob (quoted)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the Meta-Llama-3-8B model directory}
EMBEDDER=${EMBEDDER:?set EMBEDDER to a local jina-embeddings-v3 directory}
WORK_DIR=${WORK_DIR:-$NEXTLONG_DATA/nextlong_pool.work}   # pool shared by every dataset and split
# IVF index sized for the pool: about 85M chunks of <= 2048 characters from FineWeb-Edu 10BT + Cosmopedia v2
# (~38B tokens at ~450 tokens per chunk); 65536 lists is ~7 sqrt(N) (FAISS's guideline: 4-16 sqrt(N)) and the
# index is trained on 64 vectors per list. PQ64 keeps the index at ~6 GB.
INDEX_FACTORY=${INDEX_FACTORY:-IVF65536,PQ64}
INDEX_TRAIN_SIZE=${INDEX_TRAIN_SIZE:-4194304}
NPROBE=${NPROBE:-64}
VALID_FRACTION=${VALID_FRACTION:-0.005}   # share of documents held out for validation
TEST_FRACTION=${TEST_FRACTION:-0.005}     # share of documents held out for test
SEED=${SEED:-1234}
TASKS=${TASKS:-${SLURM_GPUS_ON_NODE:-8}}  # local parallel tasks per stage (one GPU each for the embedding)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

synth() {  # synth <split> <output prefix> <samples>
  local split=$1 prefix=$2 samples=$3
  if [[ -f "${prefix}_manifest.json" && -z "${FORCE:-}" ]]; then
    echo "$(date -Is) $split: ${prefix}_manifest.json exists, skipped (FORCE=1 redoes it)"
    return 0
  fi
  echo "$(date -Is) $split: $samples samples of $TARGET_LENGTH tokens -> $prefix"
  "$PYTHON" preprocessing/make_nextlong_bin.py \
    --input "$FINEWEB_EDU" --input-name fineweb-edu \
    --input "$COSMOPEDIA_V2" --input-name cosmopedia-v2 \
    --mix 1 --mix 1 \
    --tokenizer "$TOKENIZER" \
    --embedder "$EMBEDDER" --trust-remote-code \
    --index-factory "$INDEX_FACTORY" --nprobe "$NPROBE" --index-train-size "$INDEX_TRAIN_SIZE" \
    --target-length "$TARGET_LENGTH" --granularity 2048 --candidates 512 --max-candidates 2048 \
    --split "$split" --valid-fraction "$VALID_FRACTION" --test-fraction "$TEST_FRACTION" \
    --max-samples "$samples" --seed "$SEED" --tasks "$TASKS" --no-progress \
    --work-dir "$WORK_DIR" --output-prefix "$prefix"
}

cd "$REPO_DIR"
mkdir -p "$NEXTLONG_DATA"
# held-out sets first (small); the training set last, so that a requeued job resumes it where it stopped
synth valid "${OUT}_valid" "$HELDOUT_SAMPLES"
synth test "${OUT}_test" "$HELDOUT_SAMPLES"
synth train "$OUT" "$TRAIN_SAMPLES"
echo "$(date -Is) done: $OUT, ${OUT}_valid, ${OUT}_test (_text_document, _lossweight_document, _manifest.json)"
