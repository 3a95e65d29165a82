"""Process layout for K co-evolving branches in one torch.distributed world.

world = K branch groups x (TP x CP x DP x PP ranks each). Branch ``k`` owns the contiguous ranks
``[k * n, (k + 1) * n)`` with ``n = TP * CP * DP * PP``; inside a branch the order is megatron's
``tp-cp-dp-pp`` (TP fastest, so TP groups stay inside a node). Every model-parallel and
data-parallel group lives inside one branch; the only groups that cross branches are the
"branch" groups that link the ranks at the same position of every branch (the peers that
exchange rollouts and teacher log-probs).

:class:`BranchLayout` is pure arithmetic (no process groups) so it can be validated before
anything is launched; :func:`build_branch_groups` creates the groups on every rank, in the same
order everywhere, and returns this rank's :class:`BranchGroups`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_copd.errors import UserError

# Grid dimension names, fastest-varying first (megatron's `order` convention).
GRID_DIMS = ("tp", "cp", "dp", "pp", "branch")


class LayoutError(UserError, ValueError):
    """A branch layout that cannot be realised (sizes, world size, names)."""


@dataclass(frozen=True)
class BranchLayout:
    """K named branches, each with the same TP x CP x DP x PP shape."""

    names: tuple[str, ...]
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        if not self.names:
            raise LayoutError("branches: at least one branch is required")
        if len(set(self.names)) != len(self.names):
            raise LayoutError(f"branches: names must be unique, got {list(self.names)}")
        for field_name in ("tp", "pp", "dp", "cp"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{field_name}: expected an integer >= 1, got {value!r}")

    @classmethod
    def from_world(
        cls, names: tuple[str, ...], world_size: int, tp: int = 1, pp: int = 1, cp: int = 1
    ) -> "BranchLayout":
        """Derive DP from the world size; refuse sizes that do not divide evenly."""
        per_dp = len(names) * tp * pp * cp
        if world_size % per_dp != 0:
            raise LayoutError(
                f"world size {world_size} is not divisible by branches x TP x PP x CP = "
                f"{len(names)} x {tp} x {pp} x {cp} = {per_dp}"
            )
        return cls(tuple(names), tp=tp, pp=pp, dp=world_size // per_dp, cp=cp)

    @property
    def num_branches(self) -> int:
        return len(self.names)

    @property
    def ranks_per_branch(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def world_size(self) -> int:
        return self.num_branches * self.ranks_per_branch

    @property
    def grid_shape(self) -> list[int]:
        return [self.tp, self.cp, self.dp, self.pp, self.num_branches]

    def branch_index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise LayoutError(f"unknown branch {name!r}; branches are {list(self.names)}") from None

    def branch_of(self, rank: int) -> int:
        return rank // self.ranks_per_branch

    def local_rank_in_branch(self, rank: int) -> int:
        return rank % self.ranks_per_branch

    def coords(self, rank: int) -> dict[str, int]:
        """Grid coordinates of a global rank: tp, cp, dp, pp and branch indices."""
        out = {}
        rest = rank
        for dim, size in zip(GRID_DIMS, self.grid_shape):
            out[dim] = rest % size
            rest //= size
        return out

    def peer(self, rank: int, branch: int | str) -> int:
        """The rank at the same model-parallel position as ``rank`` in ``branch``."""
        if isinstance(branch, str):
            branch = self.branch_index(branch)
        if not 0 <= branch < self.num_branches:
            raise LayoutError(f"branch index {branch} out of range [0, {self.num_branches})")
        return branch * self.ranks_per_branch + self.local_rank_in_branch(rank)

    def branch_ranks(self, branch: int) -> list[int]:
        start = branch * self.ranks_per_branch
        return list(range(start, start + self.ranks_per_branch))

    def describe(self) -> str:
        return (
            f"{self.num_branches} branches {list(self.names)} x TP{self.tp} x CP{self.cp} x "
            f"DP{self.dp} x PP{self.pp} = {self.world_size} ranks"
        )


@dataclass
class BranchGroups:
    """This rank's view of the layout: its branch, its megatron groups, its peers."""

    layout: BranchLayout
    rank: int
    grid: HyperCommGrid
    pgs: ProcessGroupCollection
    branch_group: dist.ProcessGroup  # every rank of this branch
    cross_group: dist.ProcessGroup  # this rank's peers: same position in every branch

    @cached_property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)

    @property
    def branch(self) -> int:
        return self.coords["branch"]

    @property
    def branch_name(self) -> str:
        return self.layout.names[self.branch]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def peer(self, branch: int | str) -> int:
        return self.layout.peer(self.rank, branch)


def _new_groups(enum: list[list[int]], rank: int) -> dist.ProcessGroup | None:
    """Create one subgroup per rank list (collectively); return the one holding ``rank``."""
    mine = None
    for ranks in enum:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = group
    return mine


def build_branch_groups(layout: BranchLayout) -> BranchGroups:
    """Create every branch's megatron groups on every rank (collective, same order everywhere).

    Must run after ``torch.distributed`` is initialised with ``layout.world_size`` ranks.
    """
    world = dist.get_world_size()
    if world != layout.world_size:
        raise LayoutError(
            f"world size {world} does not match the layout: {layout.describe()}"
        )
    rank = dist.get_rank()
    grid = HyperCommGrid(layout.grid_shape, list(GRID_DIMS))
    pg = {}
    # Groups that megatron's model, DDP, optimizer and schedules take through pg_collection.
    for key, dims in {
        "tp": ["tp"],
        "cp": ["cp"],
        "dp": ["dp"],
        "pp": ["pp"],
        "tp_cp": ["tp", "cp"],
        "dp_cp": ["cp", "dp"],
        "mp": ["tp", "pp"],
        "tp_dp_cp": ["tp", "cp", "dp"],
        "tp_cp_dp_pp": ["tp", "cp", "dp", "pp"],  # the whole branch
        "branch": ["branch"],
    }.items():
        pg[key] = grid.create_pg(dims)

    # Embedding groups: first and last pipeline stage of each pipeline (tied embeddings),
    # first stage only for position embeddings. Derived from the pp enumeration.
    pp_enum = grid.get_rank_enum(["pp"])
    embd = _new_groups([[r[0], r[-1]] if len(r) > 1 else [r[0]] for r in pp_enum], rank)
    pos_embd = _new_groups([[r[0]] for r in pp_enum], rank)

    pgs = ProcessGroupCollection(
        tp=pg["tp"],
        cp=pg["cp"],
        pp=pg["pp"],
        dp=pg["dp"],
        tp_cp=pg["tp_cp"],
        dp_cp=pg["dp_cp"],
        mp=pg["mp"],
        tp_dp_cp=pg["tp_dp_cp"],
        embd=embd,
        pos_embd=pos_embd,
        # No expert parallelism: expert groups mirror the dense ones, so that megatron's DDP and
        # optimizer never fall back to world-wide or one-rank groups.
        ep=None,
        expt_tp=pg["tp"],
        expt_dp=pg["dp_cp"],
        tp_ep=pg["tp"],
        tp_ep_pp=pg["mp"],
        # The gradient norm (and so clipping) must be reduced over this branch only.
        intra_dist_opt=pg["tp_cp_dp_pp"],
        hcp=[],
    )
    return BranchGroups(
        layout=layout,
        rank=rank,
        grid=grid,
        pgs=pgs,
        branch_group=pg["tp_cp_dp_pp"],
        cross_group=pg["branch"],
    )
