"""The Qwen-VL family (Qwen3-VL) as megatron-core models.

- ``spec``: the vision tower's and multimodal RoPE's shape, read from an HF ``config.json``.
- ``positions``: 3-D (t, h, w) position ids of a token sequence with images / video frames, and
  the per-patch tables of the vision tower (2-D RoPE coordinates, learned-position taps).
- ``rope``: Qwen3-VL's interleaved multimodal rotary embedding (a drop-in for GPTModel's).
- ``vision``: the native-resolution vision encoder (megatron TransformerBlock) with the 2x2
  patch merger and DeepStack mergers.
- ``model``: :class:`QwenVLModel` (language model + vision tower + DeepStack) and its builder.
- ``hf_weights``: HF <-> megatron tensor names for the family.
"""
