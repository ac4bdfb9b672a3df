#!/usr/bin/env python
"""Synthesize NExtLong long-context training data as GPT-NeoX / megatron-core indexed datasets.

    python preprocessing/make_nextlong_bin.py --demo
    python preprocessing/make_nextlong_bin.py --input 'fineweb-edu/*.parquet' --input 'cosmopedia-v2/*.parquet' \
        --mix 1 --mix 1 --tokenizer /models/Meta-Llama-3-8B --target-length 131072 --output-prefix data/nextlong_128k

See README.md and docs/format.md.
"""

import sys

from nextlong.cli import main

if __name__ == "__main__":
    sys.exit(main())
