"""Packaging for megatron-copd (Co-evolving Policy Distillation on Megatron-Core)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

HF = ["transformers>=5.0,<6", "safetensors>=0.4", "protobuf>=4"]  # protobuf: SentencePiece -> HF
# av: video files; torchvision: transformers' Qwen-VL video processors need it
MULTIMODAL = ["pillow>=10", "megatron-energon>=7.4,<8", "av>=12", "torchvision"]
# Transformer Engine is only useful on CUDA machines; it must never be installed on CPU-only
# machines (merely importing it makes megatron-core pick TE norms that break CPU runs).
GPU = ["transformer-engine[pytorch]>=2.0"]
PLOT = ["matplotlib>=3.8"]  # tools/plot_metrics.py
# av, torchvision: the video tests run; hypothesis: the config / record fuzz test
TEST = ["pytest>=8", "hypothesis>=6.100", "pillow>=10", "av>=12", "torchvision"] + PLOT + HF

setup(
    name="megatron-copd",
    version="0.1.0",
    description="Co-evolving Policy Distillation (CoPD) for multimodal models on Megatron-Core",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_copd", "megatron_copd.*"]),
    package_data={"megatron_copd": ["configs/*.yaml"]},
    install_requires=[
        "megatron-core>=0.19,<0.20",
        "torch>=2.6",
        "numpy>=1.26",
        "pyyaml>=6",
        "psutil>=5.9",  # megatron dist-checkpoint save
        "tqdm>=4.66",  # progress bars; megatron's static inference engine
        "tensorboard>=2.16",
        "sentencepiece>=0.2",
        "math-verify>=0.7",
        "pyarrow>=14",  # Parquet prompt datasets
        "pillow>=10",  # the embedded toy world draws and reads PNG images
    ],
    extras_require={
        "hf": HF,
        "multimodal": MULTIMODAL,
        "gpu": GPU,
        "plot": PLOT,
        "test": TEST,
    },
    entry_points={"console_scripts": ["copd=megatron_copd.cli:main"]},
)
