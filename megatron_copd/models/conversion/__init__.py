"""Hugging Face interop: per-family parameter mappings (``mapping``), config translation
(``hf_config``), safetensors I/O, and the import / export drivers behind
``tools/import_from_hf.py`` and ``tools/convert_to_hf.py``."""
