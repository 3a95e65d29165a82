"""Training checkpoints: group-local concurrent saves, exact resume, resharding, the partial-
checkpoint path, preemption (SIGTERM -> checkpoint -> EXIT_REQUEUE), SIGKILL mid-save, errors."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness import run_world
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from model_fixtures import IMAGE_TOKEN, lm_batch, tiny_config

from megatron_copd.checkpoint.ckpt_dirs import (
    iter_name,
    scan_branch_dir,
    verify_files,
    write_latest,
)
from megatron_copd.checkpoint.model_io import load_model
from megatron_copd.errors import CheckpointError
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
from megatron_copd.runtime.exit_codes import EXIT_REQUEUE
from megatron_copd.runtime.megatron_state import init_megatron_state
from megatron_copd.training.branch_model import BranchModel
from megatron_copd.training.checkpointing import (
    CheckpointManager,
    first_model_difference,
    retention_victims,
)
from megatron_copd.runtime.preemption import PreemptionHandler

HERE = Path(__file__).parent


# ------------------------------------------------------------------------ pure / local units
def _fake_checkpoint(path: Path, meta: bool = True) -> None:
    """A real (tiny) torch_dist directory written without any process group."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(1000.0), "v": torch.ones(10)}, checkpoint_id=str(path),
             no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    if meta:
        (path / "copd_meta.json").write_text("{}")


def test_scan_reports_incomplete_dirs_and_follows_latest(tmp_path):
    for n in (2, 4):
        _fake_checkpoint(tmp_path / iter_name(n))
    _fake_checkpoint(tmp_path / (iter_name(6) + ".tmp"), meta=False)
    _fake_checkpoint(tmp_path / iter_name(8), meta=False)  # renamed but no completion marker
    scan = scan_branch_dir(tmp_path)
    assert sorted(scan.complete) == [2, 4]
    assert scan.latest is None and "no latest" in scan.latest_problem
    line = scan.report()
    assert "\n" not in line
    assert "iter_0000006.tmp (unfinished write)" in line
    assert "iter_0000008 (no copd_meta.json)" in line
    write_latest(tmp_path, 2)
    assert scan_branch_dir(tmp_path).latest == 2
    write_latest(tmp_path, 8)  # points to the incomplete one: not used
    scan = scan_branch_dir(tmp_path)
    assert scan.latest is None and "not a complete checkpoint" in scan.latest_problem


def test_verify_files_names_missing_truncated_and_corrupted_files(tmp_path):
    good = tmp_path / "good"
    _fake_checkpoint(good)
    verify_files(good)

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        with pytest.raises(CheckpointError) as e:
            verify_files(d)
        assert "\n" not in str(e.value)
        return str(e.value)

    shard = next(good.glob("*.distcp")).name
    assert f"missing shard file {shard}" in broken("noshard", lambda d: (d / shard).unlink())
    msg = broken("short", lambda d: os.truncate(d / shard, 100))
    assert "truncated shard file" in msg and shard in msg
    msg = broken("badindex", lambda d: os.truncate(d / ".metadata", 30))
    assert ".metadata: corrupted metadata" in msg
    msg = broken("badcfg", lambda d: (d / "metadata.json").write_text('{"sharded_'))
    assert "metadata.json: corrupted metadata" in msg


def test_model_difference_and_retention_rules():
    a = {"hidden_size": 64, "num_layers": 2, "init_std": 0.02, "vision": {"patch_size": 8}}
    assert first_model_difference(a, dict(a, init_std=0.5)) is None
    assert first_model_difference(a, dict(a, hidden_size=128)) == (
        "model.hidden_size: checkpoint 64, config 128")
    assert first_model_difference(a, dict(a, vision={"patch_size": 4})) == (
        "model.vision.patch_size: checkpoint 8, config 4")
    assert first_model_difference(a, dict(a, vision=None)).startswith("model.vision:")
    its = [2, 4, 6, 8, 10, 12]
    assert retention_victims(its, 12, keep_last=2, keep_every=0) == [2, 4, 6, 8]
    assert retention_victims(its, 12, keep_last=2, keep_every=4) == [2, 6]
    assert retention_victims(its, 12, keep_last=0, keep_every=0) == []
    # a newer checkpoint from a discarded future is not touched by the retention of 8
    assert retention_victims(its, 8, keep_last=1, keep_every=0) == [2, 4, 6]


def test_preemption_flag_from_signal_without_process_group():
    with PreemptionHandler(grace_seconds=30) as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert handler.signalled and handler.signal_name == "SIGUSR1"
        assert handler.should_stop()
        assert 0 < handler.time_left() <= 30
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


# ------------------------------------------------------------------ multi-process (gloo) tests
def _lm_loss(output, batch):
    logits = output.transpose(0, 1).contiguous().clone()
    labels = batch["labels"].transpose(0, 1).contiguous()
    loss = vocab_parallel_cross_entropy(logits, labels, tp_group=_lm_loss.tp_group)
    return loss.sum(), torch.tensor(loss.numel()), {"loss": (loss.sum().item(), loss.numel())}


def _config(tp):
    cfg = tiny_config(tp=tp, branches=("a", "b"))
    cfg.optim.lr = 1e-3
    cfg.checkpoint.keep_last = 2
    return cfg


def _setup(cfg, world, seed_offset=0):
    layout = BranchLayout.from_world(cfg.branch_names, world, tp=cfg.parallel.tp,
                                     pp=cfg.parallel.pp)
    g = build_branch_groups(layout)
    init_megatron_state(g, cfg.seed + 100 * g.branch + seed_offset)
    _lm_loss.tp_group = g.pgs.tp
    return g


def _steps(model, branch, start, end):
    out = []
    for it in range(start + 1, end + 1):
        mbs = [lm_batch(seed=1000 * branch + 10 * it + j) for j in range(2)]
        for b in mbs:
            b.pop("pixels")
        r = model.train_step(mbs, _lm_loss, seq_length=24)
        out.append((r.metrics.get("loss"), r.grad_norm))
    return out


def _weights(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items() if torch.is_tensor(v)}


def _expect_error(fn) -> str | None:
    try:
        fn()
    except CheckpointError as e:
        return str(e)
    return None


def _save_and_reload(world, run_dir):
    """2 branches x TP=2: both branches save at once into their own dirs, then reload."""
    cfg = _config(tp=2)
    g = _setup(cfg, world)
    model = BranchModel(cfg, g, IMAGE_TOKEN, total_steps=10)
    ckpt = CheckpointManager(run_dir, g, cfg, base_fingerprint="fp-123")
    _steps(model, g.branch, 0, 2)
    ckpt.save(2, model, {"branch": g.branch_name, "position": 2})
    saved = _weights(model)
    ref = _steps(model, g.branch, 2, 5)

    g2 = _setup(cfg, world, seed_offset=7)  # another init: loading must overwrite everything
    fresh = BranchModel(cfg, g2, IMAGE_TOKEN, total_steps=10)
    was_different = any(not torch.equal(saved[k], v) for k, v in _weights(fresh).items())
    resumed = CheckpointManager(run_dir, g2, cfg).load_latest(fresh)
    same = all(torch.equal(saved[k], v) for k, v in _weights(fresh).items())
    again = _steps(fresh, g2.branch, 2, 5)
    d = Path(run_dir) / "checkpoints" / g.branch_name / iter_name(2)
    return {"branch": g.branch, "ref": ref, "again": again, "same": same,
            "was_different": was_different, "iteration": resumed.iteration,
            "state": resumed.engine_state, "rng": resumed.rng_restored,
            "files": sorted(os.listdir(d)), "meta": json.loads((d / "copd_meta.json").read_text())}


def _reshard_and_errors(world, run_dir, err_dir):
    """The TP=2 checkpoints at TP=1 (x DP=2); then every error path."""
    cfg = _config(tp=1)
    g = _setup(cfg, world)
    model = BranchModel(cfg, g, IMAGE_TOKEN, total_steps=10)
    ckpt = CheckpointManager(run_dir, g, cfg)
    resumed = ckpt.load_latest(model)
    traj = _steps(model, g.branch, 2, 5)  # every DP rank sees the same batches: same gradient

    # Control: the same weights with a fresh optimizer must give another trajectory.
    control = BranchModel(cfg, g, IMAGE_TOKEN, total_steps=10)
    own = Path(run_dir) / "checkpoints" / g.branch_name / iter_name(2)
    load_model(control.model, g.pgs, own, process_group=g.branch_group)
    ctrl = _steps(control, g.branch, 2, 5)

    errs = Path(err_dir) / g.branch_name
    if dist.get_rank(g.branch_group) == 0:
        for name in ("noshard", "badindex", "badmeta"):
            shutil.copytree(own, errs / name)
        next((errs / "noshard").glob("*.distcp")).unlink()
        os.truncate(errs / "badindex" / ".metadata", 40)
        os.truncate(errs / "badmeta" / "copd_meta.json", 40)
    dist.barrier()
    other = Path(run_dir) / "checkpoints" / ("b" if g.branch_name == "a" else "a") / iter_name(2)
    wrong_cfg = copy.deepcopy(cfg)
    wrong_cfg.model.ffn_hidden_size = 64
    errors = {
        "shape": _expect_error(lambda: CheckpointManager(run_dir, g, wrong_cfg).load(own, model)),
        "noshard": _expect_error(lambda: ckpt.load(errs / "noshard", model)),
        "badindex": _expect_error(lambda: ckpt.load(errs / "badindex", model)),
        "badmeta": _expect_error(lambda: ckpt.load(errs / "badmeta", model)),
        "branch": _expect_error(lambda: ckpt.load(other, model)),
    }
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(run_dir) / "checkpoints" / "audio").mkdir()
    dist.barrier()
    errors["unknown"] = _expect_error(lambda: CheckpointManager(run_dir, g, cfg))

    # Preemption with no time left for a save: nothing is written, the decision is agreed.
    handler = PreemptionHandler(grace_seconds=30.0)
    handler.request_stop("test")
    ckpt.last_save_seconds = 100.0 if g.branch == 1 else 0.0  # one branch would be too slow
    skipped = not ckpt.save_for_preemption(7, model, {"x": 1}, handler)
    ckpt.last_save_seconds = 0.0
    written = ckpt.save_for_preemption(7, model, {"x": 1}, handler)
    return {"branch": g.branch, "traj": traj, "ctrl": ctrl, "rng": resumed.rng_restored,
            "iteration": resumed.iteration, "state": resumed.engine_state,
            "errors": errors, "skipped": skipped,
            "written": written, "events": ckpt.events}


def _distributed_optimizer(world, run_dir):
    """The GPU default: megatron's DistributedOptimizer (state sharded over DP), saved in its
    fully_reshardable format at DP=2, resumed exactly, then resharded to PP=2 x DP=1."""
    cfg = _config(tp=1)
    cfg.parallel.distributed_optimizer = True
    g = _setup(cfg, world)
    model = BranchModel(cfg, g, IMAGE_TOKEN, total_steps=10)
    _steps(model, g.branch, 0, 2)
    CheckpointManager(run_dir, g, cfg).save(2, model, {})
    ref = _steps(model, g.branch, 2, 5)
    g = _setup(cfg, world, seed_offset=7)
    fresh = BranchModel(cfg, g, IMAGE_TOKEN, total_steps=10)
    CheckpointManager(run_dir, g, cfg).load_latest(fresh)
    again = _steps(fresh, g.branch, 2, 5)
    cfg2 = copy.deepcopy(cfg)
    cfg2.parallel.pp = 2
    g = _setup(cfg2, world)
    pp2 = BranchModel(cfg2, g, IMAGE_TOKEN, total_steps=10)
    CheckpointManager(run_dir, g, cfg2).load_latest(pp2)
    return {"ref": ref, "again": again, "pp2": _steps(pp2, g.branch, 2, 5),
            "last_stage": g.is_last_stage}


def _branches_worker(rank, world, run_dir, err_dir, dist_opt_dir):
    return (_save_and_reload(world, run_dir), _reshard_and_errors(world, run_dir, err_dir),
            _distributed_optimizer(world, dist_opt_dir))


def test_concurrent_branch_saves_resume_reshard_and_errors(tmp_path):
    run_dir = str(tmp_path / "run")
    results = run_world(_branches_worker, 4,
                        args=(run_dir, str(tmp_path / "errs"), str(tmp_path / "distopt")))
    out = [r[0] for r in results]
    for o in out:
        assert o["same"] and o["was_different"], o["branch"]
        assert o["iteration"] == 2 and o["rng"] is True
        assert o["state"] == {"branch": "ab"[o["branch"]], "position": 2}
        assert o["again"] == o["ref"], "resume at the same layout must be bit-identical"
        assert o["meta"]["branch"] == "ab"[o["branch"]] and o["meta"]["iteration"] == 2
        assert o["meta"]["base_fingerprint"] == "fp-123" and o["meta"]["layout"]["tp"] == 2
    # Each branch's directory holds only its own ranks' shards (global ranks 0,1 vs 2,3).
    assert [f for f in out[0]["files"] if f.endswith(".distcp")] == ["__0_0.distcp",
                                                                    "__1_0.distcp"]
    assert [f for f in out[2]["files"] if f.endswith(".distcp")] == ["__2_0.distcp",
                                                                    "__3_0.distcp"]
    assert out[0]["ref"] != out[2]["ref"]

    for r in (r[1] for r in results):
        ref = out[2 * r["branch"]]["ref"]
        assert r["iteration"] == 2 and r["rng"] is False
        assert r["state"] == {"branch": "ab"[r["branch"]], "position": 2}
        for (loss, gn), (rloss, rgn) in zip(r["traj"], ref):
            assert abs(loss - rloss) <= 1e-5 * abs(rloss), (r["traj"], ref)
            assert abs(gn - rgn) <= 1e-4 * abs(rgn)
        # the optimizer state mattered: a fresh optimizer diverges after the first update
        assert abs(r["ctrl"][2][0] - ref[2][0]) > 1e-4 * abs(ref[2][0]), (r["ctrl"], ref)
        e = r["errors"]
        name = "ab"[r["branch"]]
        assert all(v and "\n" not in v for v in e.values()), e
        assert "saved for another model: model.ffn_hidden_size: checkpoint 128, config 64" in (
            e["shape"])
        assert "missing shard file __" in e["noshard"]
        assert ".metadata: corrupted metadata" in e["badindex"]
        assert "copd_meta.json: corrupted metadata" in e["badmeta"]
        assert f"but this rank trains branch {name!r}" in e["branch"]
        assert "branch 'audio', which the config does not have" in e["unknown"]
        assert r["skipped"] and r["written"]
    assert any("preemption: not saving iteration 7" in e for e in results[0][1]["events"])

    for r in (r[2] for r in results):
        assert r["again"] == r["ref"], "distributed optimizer: exact resume"
        for (loss, gn), (rloss, rgn) in zip(r["pp2"], r["ref"]):
            assert abs(gn - rgn) <= 1e-4 * abs(rgn)  # the grad norm is branch-wide
            if r["last_stage"]:
                assert abs(loss - rloss) <= 1e-5 * abs(rloss)
    assert sum(r[2]["last_stage"] for r in results) == 2
    assert (tmp_path / "run" / "checkpoints" / "a" / "latest").read_text().strip() == iter_name(7)


# --------------------------------------------------- real worker processes: kill and resume
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
        with open(log_dir / f"rank{r}.log", "ab") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen([sys.executable, str(HERE / "ckpt_driver.py"), *args],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_for(cond, procs, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("worker processes did not reach the expected point")
        time.sleep(0.05)


def _finish(procs, timeout=240.0) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _rows(out: Path, branch: str) -> list[dict]:
    path = out / f"losses_{branch}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _losses(out: Path, branch: str) -> dict[int, dict]:
    """Step -> row; a step run again after a resume replaces the killed run's row."""
    return {r["it"]: r for r in _rows(out, branch)}


def test_kill_during_save_sigterm_and_resume_are_bit_identical(tmp_path):
    total, world = 8, 2
    common = ["--total", str(total), "--interval", "2"]
    ref_out, out = tmp_path / "ref_out", tmp_path / "out"
    for d in (ref_out, out):
        d.mkdir()
    # Uninterrupted reference (synchronous saves).
    ref = _launch(world, common + ["--run-dir", str(tmp_path / "ref"), "--out", str(ref_out)],
                  tmp_path)

    run = ["--run-dir", str(tmp_path / "run"), "--out", str(out)]
    # 1) SIGKILL in the middle of writing iteration 4 (shards on disk, no .metadata yet).
    procs = _launch(world, common + run + ["--hang-save", "4"], tmp_path)
    assert _finish(ref) == [0, 0]
    _wait_for(lambda: any(out.glob("hanging_*")), procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _finish(procs)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "text" / (iter_name(4) + ".tmp")).is_dir()
    assert (ckpts / "text" / "latest").read_text().strip() == iter_name(2)
    # A renamed directory without the completion marker is never loaded either.
    (ckpts / "image" / iter_name(3)).mkdir()

    # 2) Resume (async saves), then SIGTERM only rank 0 mid-run: every rank stops after the
    #    same step, a checkpoint is written, the exit status is EXIT_REQUEUE.
    procs = _launch(world, common + run + ["--async-save", "--step-sleep", "0.3"], tmp_path)
    _wait_for(lambda: any(r["resumed_from"] == 2 and r["it"] >= 4 for r in _rows(out, "image")),
              procs)
    sent = time.monotonic()
    procs[0].send_signal(signal.SIGTERM)
    codes = _finish(procs)
    signal_to_exit = time.monotonic() - sent
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], codes
    ev = [json.loads((out / f"events_{r}.json").read_text()) for r in range(world)]
    assert ev[0]["start"] == 2 and ev[0]["rng_restored"] is True
    report = next(e for e in ev[1]["events"] if "ignoring incomplete" in e)
    assert "iter_0000003 (no copd_meta.json)" in report
    report = next(e for e in ev[0]["events"] if "ignoring incomplete" in e)
    assert "iter_0000004.tmp (unfinished write)" in report
    stopped = int((ckpts / "text" / "latest").read_text().strip()[5:])
    assert stopped >= 4 and (ckpts / "image" / "latest").read_text().strip() == iter_name(stopped)
    print(f"\nSIGTERM -> checkpoint of iteration {stopped} -> exit {EXIT_REQUEUE}: "
          f"{signal_to_exit:.2f}s from signal to process exit (checkpoint written "
          f"{ev[0]['signal_to_save_done_s']:.2f}s after the signal)")

    # 3) Resume from the preemption checkpoint and finish.
    procs = _launch(world, common + run + ["--async-save"], tmp_path)
    assert _finish(procs) == [0, 0]
    ev = json.loads((out / "events_0.json").read_text())
    assert ev["start"] == stopped

    for r in range(world):
        a = torch.load(ref_out / f"weights_{r}.pt")
        b = torch.load(out / f"weights_{r}.pt")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"rank {r}: weights differ"
    for branch in ("text", "image"):
        want, got = _losses(ref_out, branch), _losses(out, branch)
        assert sorted(got) == list(range(1, total + 1))
        for it in range(3, total + 1):  # every step after the first resume point
            assert got[it]["loss"] == want[it]["loss"], (branch, it)
            assert got[it]["grad_norm"] == want[it]["grad_norm"], (branch, it)
    assert not any(p.name.endswith(".tmp") for p in (ckpts / "text").iterdir())


def test_a_model_section_added_later_and_unset_is_the_same_model():
    """Checkpoints written before ``model.qwen_vl`` existed resume under configs that leave it
    unset; a set section still differs."""
    from megatron_copd.training.checkpointing import first_model_difference

    assert first_model_difference({"hidden_size": 64}, {"hidden_size": 64, "qwen_vl": None}) is None
    assert "model.qwen_vl" in first_model_difference({"hidden_size": 64},
                                                     {"hidden_size": 64, "qwen_vl": {"depth": 2}})
