"""Deterministic, resumable prompt samplers.

:class:`PromptSampler` walks a fixed record list epoch by epoch; epoch ``e`` uses the permutation
drawn from ``numpy.random.default_rng([seed, e])`` (or identity order with ``shuffle=False``).
Its whole position is three integers, so ``state_dict()`` is a tiny JSON-able dict saved with the
checkpoint and a resumed run draws exactly the prompts the uninterrupted run would have drawn.

:class:`MixedSampler` draws from several named samplers (one per domain) deterministically:
``round_robin`` cycles through them, ``proportional`` follows fixed weights (default: dataset
sizes, i.e. the union of the data) with a smooth weighted round-robin, which keeps every prefix
of the draw sequence within one draw of the exact proportions and needs no random numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from megatron_copd.data.records import PromptRecord
from megatron_copd.errors import DataError

__all__ = ["PromptSampler", "MixedSampler"]


class PromptSampler:
    """Epoch-wise permutation sampler over ``records``; batches cross epoch boundaries."""

    def __init__(self, records: Sequence[PromptRecord], seed: int, shuffle: bool = True):
        if len(records) == 0:
            raise DataError("prompt sampler: the dataset is empty (0 records)")
        self.records = records
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self.records)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            else:
                self._order = np.arange(n)
        return self._order

    def next_indices(self, n: int) -> list[int]:
        """Indices into ``records`` of the next ``n`` draws (advances the sampler)."""
        if n < 0:
            raise ValueError(f"next_batch: n must be >= 0, got {n}")
        out: list[int] = []
        while len(out) < n:
            order = self._epoch_order()
            take = min(n - len(out), len(order) - self.position)
            out.extend(int(i) for i in order[self.position : self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch += 1
                self.position = 0
                self._order = None
        return out

    def next_batch(self, n: int) -> list[PromptRecord]:
        """The next ``n`` records; continues into the next epoch's permutation when needed."""
        return [self.records[i] for i in self.next_indices(n)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "shuffle": self.shuffle,
            "num_records": len(self.records),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; the saved seed and shuffle flag win over the current
        ones so the continuation is exact. A changed dataset size is an error (the permutation
        would silently differ)."""
        try:
            n, epoch, pos = int(state["num_records"]), int(state["epoch"]), int(state["position"])
            seed = int(state["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"prompt sampler state: missing or bad entry ({e}) in {state!r}"
            ) from None
        if n != len(self.records):
            raise DataError(
                f"prompt sampler state: saved for {n} records, but the dataset now has "
                f"{len(self.records)}; resume with the same data files"
            )
        if epoch < 0 or not 0 <= pos < n:
            raise DataError(
                f"prompt sampler state: bad epoch/position {epoch}/{pos} for {n} records"
            )
        self.seed, self.epoch, self.position = seed, epoch, pos
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._order = None


class MixedSampler:
    """Deterministic mixture of named samplers (e.g. one per domain), resumable."""

    def __init__(
        self,
        samplers: Mapping[str, PromptSampler],
        mode: Literal["round_robin", "proportional"] = "proportional",
        weights: Mapping[str, float] | None = None,
    ):
        if not samplers:
            raise DataError("mixed sampler: no samplers given")
        if mode not in ("round_robin", "proportional"):
            raise ValueError(
                f"mixed sampler: mode must be 'round_robin' or 'proportional', got {mode!r}"
            )
        self.samplers = dict(samplers)
        self.names = list(self.samplers)
        self.mode = mode
        if weights is None:
            weights = {k: float(len(s)) for k, s in self.samplers.items()}
        unknown = set(weights) - set(self.names)
        if unknown:
            raise DataError(f"mixed sampler: weights name unknown samplers {sorted(unknown)}")
        w = [float(weights.get(k, 0.0)) for k in self.names]
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise DataError(f"mixed sampler: weights must be >= 0 with a positive sum, got {w}")
        total = sum(w)
        self.weights = [x / total for x in w]
        self.draws = 0
        self.credits = [0.0] * len(self.names)

    def _pick(self) -> int:
        if self.mode == "round_robin":
            return self.draws % len(self.names)
        # Smooth weighted round-robin: everyone earns its weight, the richest is drawn and pays 1.
        for i, w in enumerate(self.weights):
            self.credits[i] += w
        best = max(range(len(self.names)), key=lambda i: (self.credits[i], -i))
        self.credits[best] -= 1.0
        return best

    def next_sources(self, n: int) -> list[str]:
        """Which sampler each of the next ``n`` draws comes from (advances only the mixer)."""
        out = []
        for _ in range(n):
            out.append(self.names[self._pick()])
            self.draws += 1
        return out

    def next_batch(self, n: int) -> list[PromptRecord]:
        """The next ``n`` records, in draw order, each from the sampler its slot was given to."""
        sources = self.next_sources(n)
        per: dict[str, list[PromptRecord]] = {
            name: self.samplers[name].next_batch(sources.count(name)) for name in self.names
        }
        cursor = dict.fromkeys(self.names, 0)
        out = []
        for name in sources:
            out.append(per[name][cursor[name]])
            cursor[name] += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "draws": self.draws,
            "credits": dict(zip(self.names, self.credits)),
            "samplers": {k: s.state_dict() for k, s in self.samplers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = set(state.get("samplers", {}))
        if saved != set(self.names):
            raise DataError(
                f"mixed sampler state: saved for samplers {sorted(saved)}, "
                f"now {sorted(self.names)}"
            )
        self.mode = state["mode"]
        self.draws = int(state["draws"])
        self.credits = [float(state["credits"][k]) for k in self.names]
        for k, s in self.samplers.items():
            s.load_state_dict(state["samplers"][k])
