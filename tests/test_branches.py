"""Branch layout arithmetic and the real process groups on 2 and 4 gloo processes."""

import pytest
import torch
import torch.distributed as dist
from harness import run_world

from megatron_copd.runtime.branches import BranchLayout, LayoutError, build_branch_groups


def test_layout_arithmetic_and_peer_map():
    layout = BranchLayout(("text", "image", "video"), tp=4, pp=2, dp=4)
    assert layout.world_size == 96
    assert layout.ranks_per_branch == 32
    for rank in range(layout.world_size):
        for b in range(3):
            peer = layout.peer(rank, b)
            assert layout.branch_of(peer) == b
            assert layout.local_rank_in_branch(peer) == layout.local_rank_in_branch(rank)
            # symmetric: the peer's peer in my branch is me
            assert layout.peer(peer, layout.branch_of(rank)) == rank
            c1, c2 = layout.coords(rank), layout.coords(peer)
            assert {k: c1[k] for k in ("tp", "cp", "dp", "pp")} == {
                k: c2[k] for k in ("tp", "cp", "dp", "pp")
            }


def test_layout_from_world_rejects_bad_sizes():
    assert BranchLayout.from_world(("a", "b"), 8, tp=2).dp == 2
    with pytest.raises(LayoutError, match="not divisible"):
        BranchLayout.from_world(("a", "b"), 6, tp=2)
    with pytest.raises(LayoutError, match="unique"):
        BranchLayout(("a", "a"))
    with pytest.raises(LayoutError, match="parallel.tp"):
        BranchLayout(("a",), tp=0)


def _groups_worker(rank, world, names, tp):
    layout = BranchLayout.from_world(names, world, tp=tp)
    g = build_branch_groups(layout)
    members = {}
    for key in ("tp", "pp", "dp", "mp", "tp_dp_cp", "intra_dist_opt", "embd"):
        members[key] = sorted(dist.get_process_group_ranks(getattr(g.pgs, key)))
    members["branch_group"] = sorted(dist.get_process_group_ranks(g.branch_group))
    members["cross"] = sorted(dist.get_process_group_ranks(g.cross_group))
    # An all-reduce in my branch's DP group must not touch the other branch.
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value, group=g.pgs.dp)
    branch_sum = torch.tensor([float(rank + 1)])
    dist.all_reduce(branch_sum, group=g.branch_group)
    return {"branch": g.branch, "members": members, "dp_sum": value.item(),
            "branch_sum": branch_sum.item(), "peers": [g.peer(b) for b in range(len(names))]}


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)])
def test_branch_groups_are_disjoint(world, tp):
    names = ("text", "image")
    out = run_world(_groups_worker, world, args=(names, tp))
    layout = BranchLayout.from_world(names, world, tp=tp)
    for rank, r in enumerate(out):
        own = set(layout.branch_ranks(r["branch"]))
        for key in ("tp", "pp", "dp", "mp", "tp_dp_cp", "intra_dist_opt", "embd", "branch_group"):
            assert set(r["members"][key]) <= own, (rank, key)
        assert set(r["members"]["branch_group"]) == own
        # cross-branch group = this rank's peers, one per branch
        assert r["members"]["cross"] == sorted(r["peers"])
        expected_dp = sum(p + 1 for p in r["members"]["dp"])
        assert r["dp_sum"] == expected_dp
        assert r["branch_sum"] == sum(p + 1 for p in own)
        for b, peer in enumerate(r["peers"]):
            assert out[peer]["peers"][r["branch"]] == rank
