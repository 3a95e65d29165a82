"""Prompt datasets: validated records (JSONL / Parquet) and deterministic resumable samplers."""

from megatron_copd.data.records import PromptRecord, load_many, load_records, write_jsonl
from megatron_copd.data.sampler import MixedSampler, PromptSampler

__all__ = [
    "MixedSampler",
    "PromptRecord",
    "PromptSampler",
    "load_many",
    "load_records",
    "write_jsonl",
]
