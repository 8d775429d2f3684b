"""megagopher: 3D-parallel (tensor, pipeline, data) LLM pretraining on torch.distributed.

The Triton kernels live in the top-level ``kernels/`` folder but are installed as ``megagopher.kernels``
(PyPI already has a package that owns the top-level name ``kernels``).

Install torch first (``pip install torch==2.13.0``): an open-ended torch requirement resolved by pip on
its own pulls a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="megagopher",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining with Triton kernels, proven correct on CPU",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megagopher", "megagopher.*"]) + ["megagopher.kernels"],
    package_dir={"megagopher.kernels": "kernels"},
    # the MTPB problem set and its reference programs: --task mtpb reads the problems by default
    package_data={"megagopher.evaluation": ["*.jsonl"]},
    install_requires=[
        "torch>=2.3",
        "numpy",
        "regex",
        "safetensors>=0.4",  # checkpoint shards and the Hugging Face export
        "tensorboard",
        "triton>=3.0; platform_system == 'Linux'",
        # the tokenizer kinds a model ships (megagopher/data/tokenizer.py) and Parquet/Arrow input
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "tiktoken>=0.7",
        "pyarrow>=15",
    ],
    extras_require={
        "wandb": ["wandb>=0.17"],             # run.wandb_project
        "datasets": ["datasets>=2.16"],       # writing save_to_disk corpora (reading needs only pyarrow)
        "eval": ["lm-eval>=0.4.5"],           # python -m megagopher.lm_eval
        # test-only peers: transformers checks our HF import/export and tokenizers; megatron-core (installed
        # with --no-deps by examples/setup_env.sh) reads our indexed datasets. pytest-xdist runs the suite's files
        # on every core (pytest.ini). The optional extras are tested too, so the test extra holds them all.
        "test": ["pytest", "pytest-xdist>=3.6", "hypothesis", "transformers", "wandb>=0.17", "datasets>=2.16",
                 "lm-eval>=0.4.5"],
    },
)
