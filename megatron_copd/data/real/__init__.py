"""Converters from the paper's kinds of real data to this project's prompt records (JSONL):
text math with checkable answers (``convert_math``), image and video question answering in
JSONL / Parquet with media as paths or embedded bytes (``convert_image_qa``,
``convert_video_qa``), and energon-prepared WebDatasets (``convert_energon``).
CLI: ``python tools/prepare_data.py {math,image,video,energon} SRC --output OUT.jsonl``."""

from megatron_copd.data.real.energon_qa import convert_energon
from megatron_copd.data.real.math_text import convert_math
from megatron_copd.data.real.visual_qa import convert_image_qa, convert_video_qa

__all__ = ["convert_energon", "convert_image_qa", "convert_math", "convert_video_qa"]
