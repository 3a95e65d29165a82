"""An energon-prepared WebDataset (``energon prepare``) -> prompt records.

Reads one split in order with megatron-energon's own loader (no shuffling, one pass, no worker
processes) and writes each sample as a record: ``VQASample`` (the highest-weighted answer, else
the first), ``MultiChoiceVQASample`` (choices listed, answer = letter, verifier ``choice``) and
``VidQASample`` (the video file's bytes written as they are). Images are decoded by energon and
stored as PNG under ``media_dir``. Large sets stay in energon for training-time streaming; this
converter is for the records-based path (RL prompt sets of a few thousand to a few hundred
thousand items).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

from megatron_copd.data.real.common import (
    LETTERS,
    ConvertReport,
    MediaStore,
    RecordSink,
    Skips,
    format_choices,
)
from megatron_copd.data.real.visual_qa import _video_suffix
from megatron_copd.errors import DataError

INSTALL_HINT = "install the multimodal extra: pip install 'megatron-copd[multimodal]'"


def convert_energon(
    path: str | os.PathLike,
    output: str | os.PathLike,
    media_dir: str | os.PathLike | None = None,
    *,
    domain: str = "image",
    split_part: str = "train",
    reward: str | None = None,
    id_prefix: str | None = None,
    limit: int | None = None,
) -> ConvertReport:
    """Convert the ``split_part`` split of an energon dataset; returns the record count."""
    try:
        from megatron.energon import (
            MultiChoiceVQASample,
            VidQASample,
            VQASample,
            WorkerConfig,
            get_loader,
            get_val_dataset,
        )
    except ImportError:
        raise DataError(f"{path}: reading energon datasets needs megatron-energon; "
                        f"{INSTALL_HINT}") from None
    path, output = Path(path), Path(output)
    if not (path / ".nv-meta").is_dir():
        raise DataError(f"{path}: not an energon dataset (no .nv-meta; run 'energon prepare')")
    store = MediaStore(media_dir or output.parent / f"{output.stem}_media")
    prefix = id_prefix or path.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # energon's deprecation notices about dataset.yaml
        try:
            dataset = get_val_dataset(
                str(path), split_part=split_part, batch_size=None, image_decode="pil",
                worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
            )
        except Exception as e:  # noqa: BLE001 - energon raises many types for bad metadata
            raise DataError(f"{path}: cannot open split {split_part!r}: {e}") from None
        verifiers: Counter = Counter()
        with RecordSink(output) as sink:
            for i, s in enumerate(get_loader(dataset)):
                if limit is not None and i >= limit:
                    break
                key = getattr(s, "__key__", str(i))
                where = f"{path}: sample {key}"
                rec = {"id": f"{prefix}-{key}", "domain": domain, "reward": reward,
                       "meta": {"source": f"energon:{path.name}/{split_part}"}}
                if isinstance(s, MultiChoiceVQASample):
                    choices = list(s.choices or [])
                    if not 0 <= s.correct_choice_idx < len(choices):
                        raise DataError(f"{where}: correct_choice_idx {s.correct_choice_idx} "
                                        f"outside {len(choices)} choices")
                    rec.update(prompt=format_choices(s.context, choices, where),
                               answer=LETTERS[s.correct_choice_idx], reward="choice",
                               images=[_image(store, s.image, where)])
                elif isinstance(s, VQASample):
                    rec.update(prompt=s.context, answer=_best_answer(s, where),
                               images=[_image(store, s.image, where)])
                elif isinstance(s, VidQASample):
                    data = s.video.stream.getvalue()
                    rec.update(prompt=s.context, answer=_best_answer(s, where),
                               video=store.put(data, _video_suffix(data)))
                else:
                    raise DataError(f"{where}: sample type {type(s).__name__} is not supported "
                                    f"(VQASample, MultiChoiceVQASample, VidQASample)")
                sink.add(rec, where)
                verifiers[rec["reward"] or "domain default"] += 1
            return ConvertReport(sink.close(), dict(verifiers), Skips())


def _best_answer(s, where: str) -> str:
    answers = [str(a).strip() for a in (s.answers or [])]
    if not answers or not any(answers):
        raise DataError(f"{where}: no answer")
    weights = getattr(s, "answer_weights", None)
    if weights is not None and len(weights) == len(answers):
        return answers[int(max(range(len(answers)), key=lambda j: float(weights[j])))]
    return next(a for a in answers if a)


def _image(store: MediaStore, image, where: str) -> str:
    if hasattr(image, "save"):
        return store.put_image(image, where, Path("."))
    import torch
    from PIL import Image

    if isinstance(image, torch.Tensor):  # energon's torch decoders: [C, H, W] in [0, 1]
        arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return store.put_image(Image.fromarray(arr), where, Path("."))
    raise DataError(f"{where}: unexpected image type {type(image).__name__}")
