"""Prompt samplers: epoch permutations, batches across epochs, exact resume, mixtures."""

import json
from collections import Counter

import pytest

from megatron_copd.data.records import PromptRecord
from megatron_copd.data.sampler import MixedSampler, PromptSampler
from megatron_copd.errors import DataError


def _recs(n: int, domain: str = "text") -> list[PromptRecord]:
    return [PromptRecord(f"{domain}{i}", domain, f"p{i}", str(i)) for i in range(n)]


def _ids(batch):
    return [r.id for r in batch]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    recs = _recs(10)
    s = PromptSampler(recs, seed=3)
    e0, e1 = _ids(s.next_batch(10)), _ids(s.next_batch(10))
    assert sorted(e0) == sorted(e1) == sorted(r.id for r in recs)
    assert e0 != e1  # a fresh permutation per epoch
    assert s.epoch == 2 and s.position == 0
    assert e0 == _ids(PromptSampler(recs, seed=3).next_batch(10))  # deterministic
    assert e0 != _ids(PromptSampler(recs, seed=4).next_batch(10))


def test_batches_cross_epoch_boundaries():
    recs = _recs(7)
    ref = PromptSampler(recs, seed=0)
    stream = _ids(ref.next_batch(7)) + _ids(ref.next_batch(7)) + _ids(ref.next_batch(7))
    s = PromptSampler(recs, seed=0)
    got = _ids(s.next_batch(3)) + _ids(s.next_batch(5)) + _ids(s.next_batch(9))
    assert got == stream[:17]
    assert (s.epoch, s.position) == (2, 3)
    assert _ids(s.next_batch(0)) == []


def test_no_shuffle_is_file_order():
    s = PromptSampler(_recs(4), seed=9, shuffle=False)
    assert _ids(s.next_batch(6)) == ["text0", "text1", "text2", "text3", "text0", "text1"]


def test_resume_draws_exactly_the_same_prompts():
    recs = _recs(13)
    full = PromptSampler(recs, seed=11)
    expected = [_ids(full.next_batch(5)) for _ in range(8)]

    first = PromptSampler(recs, seed=11)
    got = [_ids(first.next_batch(5)) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert set(state) >= {"seed", "epoch", "position"}
    # The resumed run was even configured with another seed: the saved one wins.
    resumed = PromptSampler(recs, seed=999)
    resumed.load_state_dict(state)
    got += [_ids(resumed.next_batch(5)) for _ in range(5)]
    assert got == expected


def test_resume_rejects_changed_dataset_and_bad_state():
    s = PromptSampler(_recs(5), seed=1)
    s.next_batch(2)
    state = s.state_dict()
    with pytest.raises(DataError, match="saved for 5 records, but the dataset now has 6"):
        PromptSampler(_recs(6), seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="missing or bad entry"):
        PromptSampler(_recs(5), seed=1).load_state_dict({"seed": 1})
    with pytest.raises(DataError, match="bad epoch/position"):
        PromptSampler(_recs(5), seed=1).load_state_dict({**state, "position": 5})
    with pytest.raises(DataError, match="empty"):
        PromptSampler([], seed=0)


def test_mixed_round_robin_order():
    m = MixedSampler(
        {"a": PromptSampler(_recs(2, "a"), 0, False), "b": PromptSampler(_recs(3, "b"), 0, False)},
        mode="round_robin",
    )
    assert _ids(m.next_batch(5)) == ["a0", "b0", "a1", "b1", "a0"]


def test_mixed_proportional_follows_weights_in_every_prefix():
    m = MixedSampler(
        {
            "a": PromptSampler(_recs(50, "a"), 1),
            "b": PromptSampler(_recs(30, "b"), 2),
            "c": PromptSampler(_recs(20, "c"), 3),
        }
    )  # default weights = dataset sizes: 0.5 / 0.3 / 0.2
    sources = m.next_sources(100)
    assert Counter(sources) == {"a": 50, "b": 30, "c": 20}
    for k in range(1, 101):  # smooth: every prefix within one draw of the exact share
        c = Counter(sources[:k])
        for name, w in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
            assert abs(c[name] - w * k) < 1.0 + 1e-9

    m2 = MixedSampler(
        {"a": PromptSampler(_recs(5, "a"), 0), "b": PromptSampler(_recs(5, "b"), 0)},
        weights={"a": 3, "b": 1},
    )
    assert Counter(r.domain for r in m2.next_batch(40)) == {"a": 30, "b": 10}


def test_mixed_resume_is_exact():
    def make(seed_shift=0):
        return MixedSampler(
            {
                "text": PromptSampler(_recs(7, "text"), 5 + seed_shift),
                "image": PromptSampler(_recs(4, "image"), 6 + seed_shift),
            },
            weights={"text": 0.6, "image": 0.4},
        )

    ref = make()
    expected = [_ids(ref.next_batch(6)) for _ in range(6)]
    a = make()
    got = [_ids(a.next_batch(6)) for _ in range(2)]
    state = json.loads(json.dumps(a.state_dict()))
    b = make(seed_shift=100)
    b.load_state_dict(state)
    got += [_ids(b.next_batch(6)) for _ in range(4)]
    assert got == expected
    other = MixedSampler({"text": PromptSampler(_recs(7, "text"), 5)})
    with pytest.raises(DataError, match="saved for samplers"):
        other.load_state_dict(state)


def test_mixed_rejects_bad_weights():
    s = {"a": PromptSampler(_recs(2), 0)}
    with pytest.raises(DataError, match="unknown samplers"):
        MixedSampler(s, weights={"z": 1.0})
    with pytest.raises(DataError, match="positive sum"):
        MixedSampler(s, weights={"a": 0.0})
