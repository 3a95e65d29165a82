"""Build (once) and cache the toy world on disk: three domains, train and held-out eval splits.

Layout of ``<cache_dir>/<name>/`` (``name`` = ``toy-v2-<seed>`` for the default sizes and knobs,
``toy-v2-<seed>-<hash>`` otherwise)::

    manifest.json                 the spec and the record counts (written last)
    text/{train,eval}.jsonl       (+ warmup.jsonl when ``warmup_size`` > 0, in every domain)
    image/{train,eval}.jsonl      image/media/<split>/<index>.png
    video/{train,eval}.jsonl      video/media/<split>/<index>_<frame>.png

Records follow the prompt-record schema (id, domain, prompt, answer, images, video, reward, meta);
media paths are relative to the JSONL file's directory. Everything is a pure function of the spec:
the same seed gives byte-identical files. Eval items are unique and never appear in train (nor
in the warm-up split).

Where RL's signal comes from: the toy base is a short supervised warm-up (training/toy_base.py).
By default it warms up on the train split itself, so RL later samples prompts the base has
memorised. With ``warmup_size`` > 0 the base learns from a separate warm-up split instead, asked
only in the canonical phrasing, while the train and eval questions come in ``phrasings`` forms
(:data:`PHRASINGS`): RL prompts are new to the base, as a real RL prompt set is new to the
pretrained model, and the base answers them only in part.

Concurrency: built through :func:`megatron_copd.data.cache.build_once` (temporary directory,
lock file, rename), so concurrent callers from several ranks get one complete world.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_copd.data.cache import build_once
from megatron_copd.data.toy import image_tasks as image_gen
from megatron_copd.data.toy import text_tasks
from megatron_copd.data.toy import video_tasks as video_gen
from megatron_copd.errors import DataError

VERSION = "toy-v2"
DOMAINS = ("text", "image", "video")
SPLITS = ("train", "eval")
WARMUP = "warmup"
"""The base's warm-up split (only in worlds with ``warmup_size`` > 0)."""
_SPLIT_STREAMS = {"train": 0, "eval": 1, WARMUP: 2}
PHRASINGS = (
    "{q}",
    "Question: {q}",
    "{q} Answer briefly.",
    "Please answer. {q}",
    "Q: {q} A:",
    "Think, then answer. {q}",
)
"""Ways a question is put (``{q}`` is the canonical question); the first is the canonical one."""
_WRITERS = 8


@dataclass(frozen=True)
class ToySpec:
    """Everything the generated world depends on."""

    seed: int = 1234
    train_size: int = 4000
    eval_size: int = 500
    text_min_steps: int = 1
    text_max_steps: int = 3
    """Operations per arithmetic problem are drawn uniformly from [min, max]."""
    text_word_frac: float = 0.3
    """Fraction of text problems phrased as word problems instead of expressions."""
    text_max_operand: int = text_tasks.MAX_ADD_OPERAND
    """Largest operand (2..99); 9 keeps every number a single digit (easier)."""
    image_tasks: tuple[str, ...] = image_gen.TASKS
    """Question types drawn for the image domain (uniformly); a subset makes it easier."""
    video_tasks: tuple[str, ...] = video_gen.TASKS
    """Question types drawn for the video domain."""
    phrasings: int = 1
    """Train/eval questions are put in one of the first ``phrasings`` forms of PHRASINGS."""
    warmup_size: int = 0
    """Items per domain of a separate warm-up split for the base (canonical phrasing); 0 = none."""

    def dir_name(self) -> str:
        knobs = dataclasses.asdict(self)
        knobs.pop("seed")
        defaults = dataclasses.asdict(ToySpec())
        defaults.pop("seed")
        if knobs == defaults:
            return f"{VERSION}-{self.seed}"
        digest = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]
        return f"{VERSION}-{self.seed}-{digest}"

    def validate(self) -> None:
        if self.train_size < 1 or self.eval_size < 1:
            raise DataError(
                f"toy world: train_size and eval_size must be >= 1, got "
                f"{self.train_size} and {self.eval_size}"
            )
        if not 1 <= self.text_min_steps <= self.text_max_steps:
            raise DataError(
                f"toy world: expected 1 <= text_min_steps <= text_max_steps, got "
                f"{self.text_min_steps} and {self.text_max_steps}"
            )
        if not 0.0 <= self.text_word_frac <= 1.0:
            raise DataError(
                f"toy world: text_word_frac must be in [0, 1], got {self.text_word_frac}"
            )
        if not 2 <= self.text_max_operand <= 99:
            raise DataError(
                f"toy world: text_max_operand must be in [2, 99], got {self.text_max_operand}"
            )
        if not 1 <= self.phrasings <= len(PHRASINGS):
            raise DataError(
                f"toy world: phrasings must be in [1, {len(PHRASINGS)}], got {self.phrasings}"
            )
        if self.warmup_size < 0:
            raise DataError(f"toy world: warmup_size must be >= 0, got {self.warmup_size}")
        for field, known in (("image_tasks", image_gen.TASKS), ("video_tasks", video_gen.TASKS)):
            chosen = getattr(self, field)
            if not chosen or set(chosen) - set(known):
                raise DataError(
                    f"toy world: {field} must be a non-empty subset of "
                    f"{list(known)}, got {list(chosen)}"
                )


@dataclass(frozen=True)
class ToyWorld:
    """A built toy world on disk."""

    root: Path
    spec: ToySpec

    domains: tuple[str, ...] = DOMAINS

    @property
    def splits(self) -> tuple[str, ...]:
        return _splits(self.spec)

    @property
    def base_split(self) -> str:
        """The split the toy base warms up on."""
        return WARMUP if self.spec.warmup_size else "train"

    def path(self, domain: str, split: str) -> Path:
        """The JSONL file of one domain and split ("train", "eval", or "warmup" if built)."""
        if domain not in DOMAINS or split not in self.splits:
            raise DataError(
                f"toy world: unknown domain/split {domain!r}/{split!r}; expected a "
                f"domain in {list(DOMAINS)} and a split in {list(self.splits)}"
            )
        return self.root / domain / f"{split}.jsonl"

    @property
    def files(self) -> dict[str, dict[str, Path]]:
        return {d: {s: self.path(d, s) for s in self.splits} for d in DOMAINS}

    def iter_rows(self, domain: str, split: str) -> Iterator[dict]:
        """The raw JSON rows of one file (the records loader validates; this is for tools)."""
        with open(self.path(domain, split), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def build_toy_world(
    cache_dir: str | os.PathLike,
    seed: int = 1234,
    train_size: int = 4000,
    eval_size: int = 500,
    **knobs,
) -> ToyWorld:
    """Generate the toy world for ``seed`` under ``cache_dir`` unless it is cached; return it.

    ``knobs`` are the remaining :class:`ToySpec` fields (difficulty). Safe to call from
    every rank at once: one builds, the others wait and reuse.
    """
    # Lists (from YAML) and tuples name the same spec.
    knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
    try:
        spec = ToySpec(seed=seed, train_size=train_size, eval_size=eval_size, **knobs)
    except TypeError as e:
        raise DataError(f"toy world: {e}") from None
    spec.validate()
    final = Path(cache_dir).expanduser() / spec.dir_name()
    build_once(final, lambda tmp: _generate(tmp, spec), "manifest.json")
    return _open(final, spec)


def _open(root: Path, spec: ToySpec) -> ToyWorld:
    manifest = json.loads((root / "manifest.json").read_text())
    expected = json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples as JSON lists
    # Worlds cached before a knob existed were built with its default: the same files.
    stored = {**json.loads(json.dumps(dataclasses.asdict(ToySpec()))), **manifest.get("spec", {})}
    if manifest.get("version") != VERSION or stored != expected:
        raise DataError(
            f"{root / 'manifest.json'}: spec does not match the requested toy world "
            f"{dataclasses.asdict(spec)}; delete {root} to rebuild it"
        )
    return ToyWorld(root=root, spec=spec)


# ---------------------------------------------------------------------------------------------
# Generation


def _splits(spec: ToySpec) -> tuple[str, ...]:
    return SPLITS + ((WARMUP,) if spec.warmup_size else ())


def _rng(spec: ToySpec, domain: str, split: str) -> np.random.Generator:
    return np.random.default_rng([spec.seed, DOMAINS.index(domain), _SPLIT_STREAMS[split]])


def _phrased(make: Callable[[np.random.Generator], dict], phrasings: int):
    """``make`` with its question put in one of the first ``phrasings`` forms (drawn after the
    problem, so ``phrasings`` = 1 draws nothing extra and leaves the world unchanged)."""
    if phrasings == 1:
        return make

    def phrase(rng: np.random.Generator) -> dict:
        item = make(rng)
        form = int(rng.integers(phrasings))
        item["prompt"] = PHRASINGS[form].format(q=item["prompt"])
        item["meta"] = {**item["meta"], "phrasing": form}
        return item

    return phrase


def _text_item(spec: ToySpec) -> Callable[[np.random.Generator], dict]:
    def make(rng: np.random.Generator) -> dict:
        p = text_tasks.generate(
            rng,
            spec.text_min_steps,
            spec.text_max_steps,
            spec.text_word_frac,
            spec.text_max_operand,
        )
        return {
            "prompt": p.prompt,
            "answer": str(p.answer),
            "reward": "numeric",
            "frames": (),
            "meta": {"task": p.kind, "steps": p.steps, "terms": list(p.terms)},
        }

    return make


def _visual_item(
    gen: Callable[[np.random.Generator], image_gen.VisualProblem],
) -> Callable[[np.random.Generator], dict]:
    def make(rng: np.random.Generator) -> dict:
        p = gen(rng)
        return {
            "prompt": p.prompt,
            "answer": p.answer,
            "reward": p.reward,
            "frames": p.frames,
            "meta": p.meta,
        }

    return make


def _key(item: dict) -> str:
    """Identity of a problem: what the model sees (prompt + drawn scene)."""
    if not item["frames"]:
        return item["prompt"]
    h = hashlib.sha256(item["prompt"].encode())
    for frame in item["frames"]:
        h.update(frame.tobytes())
    return h.hexdigest()


def _draw_split(
    make: Callable[[np.random.Generator], dict],
    rng: np.random.Generator,
    n: int,
    exclude: set[str],
    unique: bool,
    what: str,
) -> list[dict]:
    items: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise DataError(
                f"toy world: could only draw {len(items)} of {n} distinct {what} items; the "
                f"problem space is too small for this size (raise text_max_steps or lower sizes)"
            )
        item = make(rng)
        key = _key(item)
        if key in exclude or (unique and key in seen):
            continue
        seen.add(key)
        items.append(item)
    return items


def _generate(tmp: Path, spec: ToySpec) -> None:
    makers = {
        "text": _text_item(spec),
        "image": _visual_item(lambda rng: image_gen.generate(rng, spec.image_tasks)),
        "video": _visual_item(lambda rng: video_gen.generate(rng, spec.video_tasks)),
    }
    counts = {}
    for domain in DOMAINS:
        # Eval first and unique, so train can exclude it; train may repeat an easy problem.
        evals = _draw_split(
            _phrased(makers[domain], spec.phrasings),
            _rng(spec, domain, "eval"),
            spec.eval_size,
            set(),
            True,
            f"{domain}/eval",
        )
        eval_keys = {_key(i) for i in evals}
        trains = _draw_split(
            _phrased(makers[domain], spec.phrasings),
            _rng(spec, domain, "train"),
            spec.train_size,
            eval_keys,
            False,
            f"{domain}/train",
        )
        splits = [("eval", evals), ("train", trains)]
        if spec.warmup_size:  # canonical phrasing: what the base is taught
            warmups = _draw_split(
                makers[domain],
                _rng(spec, domain, WARMUP),
                spec.warmup_size,
                eval_keys,
                False,
                f"{domain}/{WARMUP}",
            )
            splits.append((WARMUP, warmups))
        for split, items in splits:
            _write_split(tmp / domain, domain, split, items)
            counts.setdefault(domain, {})[split] = len(items)
    manifest = {
        "version": VERSION,
        "spec": dataclasses.asdict(spec),
        "counts": counts,
        "files": {d: {s: f"{d}/{s}.jsonl" for s in _splits(spec)} for d in DOMAINS},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _write_split(domain_dir: Path, domain: str, split: str, items: list[dict]) -> None:
    media = domain_dir / "media" / split
    if domain != "text":
        media.mkdir(parents=True, exist_ok=True)
    domain_dir.mkdir(parents=True, exist_ok=True)
    lines, pictures = [], []
    for i, item in enumerate(items):
        rel = []
        for f, frame in enumerate(item["frames"]):
            name = f"{i:05d}.png" if domain == "image" else f"{i:05d}_{f}.png"
            pictures.append((media / name, frame))
            rel.append(f"media/{split}/{name}")
        row = {
            "id": f"{domain}-{split}-{i:05d}",
            "domain": domain,
            "prompt": item["prompt"],
            "answer": item["answer"],
            "images": rel if domain == "image" else [],
            "video": rel if domain == "video" else None,
            "reward": item["reward"],
            "meta": item["meta"],
        }
        lines.append(json.dumps(row, separators=(",", ":")))
    # Thousands of tiny files: creating them is latency-bound (zlib and file I/O release the
    # GIL), so a few threads help even on two cores. Each file's bytes do not depend on order.
    with ThreadPoolExecutor(max_workers=_WRITERS) as pool:
        list(pool.map(lambda job: Image.fromarray(job[1]).save(job[0], format="PNG"), pictures))
    (domain_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
