"""The toy world: determinism, caching, concurrency, train/eval disjointness, and answers that an
independent solver (parsing the prompt, reading the PNG pixels) agrees with."""

import hashlib
import json
import multiprocessing as mp
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_copd.data import cache
from megatron_copd.data.toy import build_toy_world
from megatron_copd.data.toy import world as world_mod
from megatron_copd.errors import DataError

SMALL = {"train_size": 60, "eval_size": 45}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_toy_world(tmp_path_factory.mktemp("toy"), seed=11, **SMALL)


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_schema(world):
    m = json.loads((world.root / "manifest.json").read_text())
    assert m["counts"] == {d: {"train": 60, "eval": 45} for d in ("text", "image", "video")}
    assert world.root.name.startswith("toy-v2-11-")  # non-default sizes get a spec hash
    for d in world.domains:
        for s in ("train", "eval"):
            rows = list(world.iter_rows(d, s))
            assert len(rows) == m["counts"][d][s]
            assert len({r["id"] for r in rows}) == len(rows)
            for r in rows:
                assert set(r) == {
                    "id",
                    "domain",
                    "prompt",
                    "answer",
                    "images",
                    "video",
                    "reward",
                    "meta",
                }
                assert r["domain"] == d and r["prompt"] and r["answer"]
                assert r["reward"] == ("numeric" if r["answer"].isdigit() else "exact")
                if d == "text":
                    assert r["images"] == [] and r["video"] is None
                elif d == "image":
                    assert len(r["images"]) == 1 and r["video"] is None
                else:
                    assert r["images"] == [] and len(r["video"]) == 4
                for rel in r["images"] + (r["video"] or []):
                    assert not Path(rel).is_absolute()
                    with Image.open(world.path(d, s).parent / rel) as img:
                        assert img.size == (32, 32) and img.mode == "RGB"


def test_default_name_and_path_errors(tmp_path):
    assert world_mod.ToySpec(seed=5).dir_name() == "toy-v2-5"
    w = world_mod.ToyWorld(tmp_path, world_mod.ToySpec())
    with pytest.raises(DataError, match="unknown domain/split 'audio'/'train'"):
        w.path("audio", "train")


def test_same_seed_gives_identical_files(world, tmp_path):
    again = build_toy_world(tmp_path, seed=11, **SMALL)
    assert again.root != world.root
    assert _tree(again.root) == _tree(world.root)
    other = build_toy_world(tmp_path, seed=12, **SMALL)
    assert (other.root / "text/train.jsonl").read_bytes() != (
        world.root / "text/train.jsonl"
    ).read_bytes()


def test_cache_hit_does_not_regenerate(world, monkeypatch):
    stamp = (world.root / "manifest.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("regenerated a cached world")

    monkeypatch.setattr(world_mod, "_generate", boom)
    again = build_toy_world(world.root.parent, seed=11, **SMALL)
    assert again.root == world.root
    assert (world.root / "manifest.json").stat().st_mtime_ns == stamp


def test_manifest_mismatch_is_refused(tmp_path):
    w = build_toy_world(tmp_path, seed=3, train_size=5, eval_size=5)
    m = json.loads((w.root / "manifest.json").read_text())
    m["spec"]["train_size"] = 99
    (w.root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="spec does not match"):
        build_toy_world(tmp_path, seed=3, train_size=5, eval_size=5)


def _build_in_process(args):
    root, seed = args
    return str(build_toy_world(root, seed=seed, train_size=30, eval_size=20).root)


def test_concurrent_builders_share_one_world(tmp_path):
    with mp.get_context("spawn").Pool(3) as pool:
        roots = pool.map(_build_in_process, [(str(tmp_path), 5)] * 3)
    assert len(set(roots)) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert _tree(Path(roots[0])) == _tree(
        build_toy_world(tmp_path / "ref", seed=5, train_size=30, eval_size=20).root
    )


def test_build_once_rename_race_and_failure(tmp_path):
    final = tmp_path / "thing"

    def racing_build(tmp):
        # Another builder (no working lock) finishes first while we are still writing.
        final.mkdir()
        (final / "done").write_text("theirs")
        (tmp / "done").write_text("ours")

    assert cache.build_once(final, racing_build, "done") is False
    assert (final / "done").read_text() == "theirs"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    def failing_build(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cache.build_once(tmp_path / "other", failing_build, "done")
    assert not (tmp_path / "other").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_specs(tmp_path):
    with pytest.raises(DataError, match="train_size and eval_size must be >= 1"):
        build_toy_world(tmp_path, seed=1, train_size=0)
    with pytest.raises(DataError, match="text_min_steps <= text_max_steps"):
        build_toy_world(tmp_path, seed=1, text_min_steps=3, text_max_steps=2)
    with pytest.raises(DataError, match="text_word_frac must be in"):
        build_toy_world(tmp_path, seed=1, text_word_frac=2.0)
    with pytest.raises(DataError, match="text_max_operand must be in"):
        build_toy_world(tmp_path, seed=1, text_max_operand=1)
    with pytest.raises(DataError, match=r"image_tasks must be a non-empty subset of .*'spin'"):
        build_toy_world(tmp_path, seed=1, image_tasks=["count", "spin"])
    with pytest.raises(DataError, match="video_tasks must be a non-empty subset"):
        build_toy_world(tmp_path, seed=1, video_tasks=[])
    with pytest.raises(DataError, match=r"phrasings must be in \[1, 6\], got 7"):
        build_toy_world(tmp_path, seed=1, phrasings=7)
    with pytest.raises(DataError, match="warmup_size must be >= 0"):
        build_toy_world(tmp_path, seed=1, warmup_size=-1)
    with pytest.raises(DataError, match="unexpected keyword argument 'colours'"):
        build_toy_world(tmp_path, seed=1, colours=3)
    with pytest.raises(DataError, match="could only draw .* distinct text/eval items"):
        build_toy_world(
            tmp_path, seed=1, train_size=5, eval_size=900, text_max_steps=1, text_word_frac=0.0
        )
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def _key(world, domain, row) -> str:
    h = hashlib.sha256(row["prompt"].encode())
    for rel in row["images"] + (row["video"] or []):
        h.update(np.asarray(Image.open(world.path(domain, "train").parent / rel)).tobytes())
    return h.hexdigest()


def test_eval_unique_and_disjoint_from_train(world):
    for d in world.domains:
        ev = [_key(world, d, r) for r in world.iter_rows(d, "eval")]
        tr = {_key(world, d, r) for r in world.iter_rows(d, "train")}
        assert len(set(ev)) == len(ev)
        assert not set(ev) & tr


# ---------------------------------------------------------------------------------------------
# Independent solvers: they read only the prompt text and the PNG pixels.


def _solve_text(prompt: str) -> int:
    if prompt.endswith(" ="):
        expr = prompt[:-2]
        assert re.fullmatch(r"[0-9 +*-]+", expr)
        return eval(expr)  # digits and + - * only (checked above)
    m = re.match(r"\w+ has (\d+)(?: bags of (\d+))? \w+\.", prompt)
    total = int(m.group(1)) * (int(m.group(2)) if m.group(2) else 1)
    for sign, n in re.findall(r"(gets|loses) (\d+)", prompt):
        total += int(n) if sign == "gets" else -int(n)
    assert prompt.endswith("now?")
    return total


def test_text_answers(world):
    for s in ("train", "eval"):
        for r in world.iter_rows("text", s):
            assert int(r["answer"]) == _solve_text(r["prompt"]), r
            assert 0 <= int(r["answer"]) <= 99
            assert r["meta"]["steps"] == len(r["meta"]["terms"]) // 2


def test_text_difficulty_knob(tmp_path):
    w = build_toy_world(
        tmp_path, seed=2, train_size=40, eval_size=20, text_min_steps=1, text_max_steps=1
    )
    ops = [
        len(re.findall(r" [+*-] |gets|loses|bags", r["prompt"]))
        for r in w.iter_rows("text", "train")
    ]
    assert set(ops) == {1}
    w3 = build_toy_world(
        tmp_path,
        seed=2,
        train_size=40,
        eval_size=20,
        text_min_steps=3,
        text_max_steps=3,
        text_word_frac=0.0,
    )
    assert all(len(r["prompt"].split()) == 8 for r in w3.iter_rows("text", "train"))
    easy = build_toy_world(tmp_path, seed=2, train_size=40, eval_size=20, text_max_operand=9)
    numbers = [
        int(n)
        for d in ("train", "eval")
        for r in easy.iter_rows("text", d)
        for n in re.findall(r"\d+", r["prompt"])
    ]
    assert max(numbers) <= 9


def test_task_subsets(tmp_path):
    # Lists (as from YAML) are accepted and name the same world as tuples.
    w = build_toy_world(
        tmp_path,
        seed=2,
        train_size=30,
        eval_size=10,
        image_tasks=["majority"],
        video_tasks=("direction", "mover"),
    )
    assert {r["meta"]["task"] for r in w.iter_rows("image", "train")} == {"majority"}
    assert {r["meta"]["task"] for r in w.iter_rows("video", "train")} == {"direction", "mover"}
    again = build_toy_world(
        tmp_path,
        seed=2,
        train_size=30,
        eval_size=10,
        image_tasks=("majority",),
        video_tasks=["direction", "mover"],
    )
    assert again.root == w.root


PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
}


def _blobs(img: np.ndarray) -> list[dict]:
    """4-connected components of non-black pixels, each with its nearest palette colour."""
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names], dtype=np.float32)
    fg = img.max(axis=2) > 60
    dist = ((img[:, :, None, :].astype(np.float32) - pal[None, None]) ** 2).sum(-1)
    cls = dist.argmin(-1)
    seen = np.zeros_like(fg)
    out = []
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q, pix = deque([(y0, x0)]), []
        while q:
            y, x = q.popleft()
            pix.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < 32 and 0 <= nx < 32 and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        ys, xs = np.array(pix).T
        colours = {names[cls[y, x]] for y, x in pix}
        assert len(colours) == 1, "a blob mixes colours: shapes touch"
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        out.append(
            {
                "colour": colours.pop(),
                "area": len(pix),
                "square": box == len(pix),
                "cy": ys.mean(),
                "cx": xs.mean(),
            }
        )
    return out


def _solve_image(prompt: str, blobs: list[dict]) -> str:
    if prompt == "What colour is the shape?":
        assert len(blobs) == 1
        return blobs[0]["colour"]
    if prompt == "Is the shape a square or a circle?":
        assert len(blobs) == 1
        return "square" if blobs[0]["square"] else "circle"
    if prompt == "How many shapes?":
        return str(len(blobs))
    if m := re.fullmatch(r"How many (\w+) shapes\?", prompt):
        return str(sum(b["colour"] == m.group(1) for b in blobs))
    if prompt == "How many squares?":
        return str(sum(b["square"] for b in blobs))
    if prompt == "How many circles?":
        return str(sum(not b["square"] for b in blobs))
    if prompt == "Which colour is most common?":
        counts = {c: sum(b["colour"] == c for b in blobs) for c in PALETTE}
        best = max(counts.values())
        assert list(counts.values()).count(best) == 1
        return max(counts, key=counts.get)
    assert prompt == "What colour is the biggest shape?"
    areas = sorted(blobs, key=lambda b: b["area"])
    assert areas[-1]["area"] > areas[-2]["area"]
    return areas[-1]["colour"]


def test_image_answers(world):
    tasks = set()
    for s in ("train", "eval"):
        for r in world.iter_rows("image", s):
            img = np.asarray(Image.open(world.path("image", s).parent / r["images"][0]))
            assert _solve_image(r["prompt"], _blobs(img)) == r["answer"], r
            tasks.add(r["meta"]["task"])
    assert tasks == {"colour", "kind", "count", "count_colour", "count_kind", "majority", "biggest"}


def _solve_video(prompt: str, frames: list[list[dict]]) -> str:
    if prompt == "In how many frames is the light on?":
        return str(sum(any(b["colour"] == "white" for b in f) for f in frames))
    # Track each colour's centroid from the first to the last frame.
    first = {b["colour"]: b for b in frames[0]}
    last = {b["colour"]: b for b in frames[-1]}
    moved = {
        c: (last[c]["cx"] - first[c]["cx"], last[c]["cy"] - first[c]["cy"])
        for c in first
        if abs(last[c]["cx"] - first[c]["cx"]) + abs(last[c]["cy"] - first[c]["cy"]) > 0
    }
    assert len(moved) == 1
    colour, (dx, dy) = next(iter(moved.items()))
    if prompt in ("What colour is the moving square?", "What colour is the square?"):
        return colour
    m = re.fullmatch(r"Which way does the (\w+) square move\?", prompt)
    assert m and m.group(1) == colour
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def test_video_answers(world):
    tasks = set()
    for s in ("train", "eval"):
        for r in world.iter_rows("video", s):
            frames = [
                _blobs(np.asarray(Image.open(world.path("video", s).parent / rel)))
                for rel in r["video"]
            ]
            assert _solve_video(r["prompt"], frames) == r["answer"], r
            tasks.add(r["meta"]["task"])
    assert tasks == {"colour", "direction", "flashes", "mover"}


def test_phrasings_and_warmup_split(tmp_path, world):
    """phrasings > 1 puts train/eval questions in several forms; warmup_size adds a split the
    base learns from, canonical only and disjoint from eval; defaults leave the world as it was."""
    w = build_toy_world(tmp_path, seed=11, phrasings=3, warmup_size=30, **SMALL)
    assert w.splits == ("train", "eval", "warmup") and w.base_split == "warmup"
    assert world.splits == ("train", "eval") and world.base_split == "train"
    with pytest.raises(DataError, match=r"split .*'warmup'.*expected .*\['train', 'eval'\]"):
        world.path("text", "warmup")
    for d in w.domains:
        canonical = {r["prompt"] for r in world.iter_rows(d, "train")}
        forms = {0: set(), 1: set(), 2: set()}
        for s in ("train", "eval"):
            for r in w.iter_rows(d, s):
                form = r["meta"]["phrasing"]
                q = r["prompt"]
                if form == 1:
                    assert q.startswith("Question: "), q
                    q = q[len("Question: "):]
                elif form == 2:
                    assert q.endswith(" Answer briefly."), q
                    q = q[: -len(" Answer briefly.")]
                forms[form].add(q)
        assert all(forms.values()), (d, forms)  # every form drawn
        warm = list(w.iter_rows(d, "warmup"))
        assert len(warm) == 30 and all("phrasing" not in r["meta"] for r in warm)
        ev = {_key(w, d, r) for r in w.iter_rows(d, "eval")}
        assert not ev & {_key(w, d, r) for r in warm}
        if d == "text":  # the same questions underneath, and the answers still check out
            for r in w.iter_rows(d, "warmup"):
                assert int(r["answer"]) == _solve_text(r["prompt"])
            assert {q for f in forms.values() for q in f} & canonical
    # the knobs at their defaults name and build the very same world
    same = build_toy_world(tmp_path / "again", seed=11, phrasings=1, warmup_size=0, **SMALL)
    assert same.root.name == world.root.name and _tree(same.root) == _tree(world.root)
