"""Block/slot allocation and cache sizing: property-based tests of the allocator and the manager."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dsv4.cache.allocator import IdAllocator
from dsv4.cache.manager import KVCacheManager
from dsv4.cache.spec import plan_cache
from dsv4.model.config import preset
from dsv4.model.numerics import Numerics


@given(st.integers(0, 64), st.lists(st.integers(0, 20), max_size=30))
def test_allocator_never_hands_out_an_id_twice(total, requests):
    alloc = IdAllocator(total)
    held: list[list[int]] = []
    for i, n in enumerate(requests):
        got = alloc.allocate(n)
        if got is None:
            assert n > alloc.num_free                  # only refuses when it really cannot
        else:
            held.append(got)
        if i % 3 == 2 and held:
            alloc.free(held.pop(0))
        flat = [x for ids in held for x in ids]
        assert len(flat) == len(set(flat)) and alloc.num_used == len(flat)
        assert alloc.num_free + alloc.num_used == total


def test_double_free_is_caught():
    alloc = IdAllocator(4)
    ids = alloc.allocate(2)
    alloc.free(ids)
    with pytest.raises(AssertionError, match="not allocated"):
        alloc.free(ids[:1])


class ManagerMachine(RuleBasedStateMachine):
    """Random admit / reserve / release: no block is leaked, shared or lost; exhaustion is reported and the
    manager keeps working after it."""

    def __init__(self):
        super().__init__()
        self.manager = KVCacheManager(num_slots=5, num_blocks=23, block_size=16)
        self.positions: dict[str, int] = {}
        self.next_id = 0
        self.refusals = 0

    @rule(positions=st.integers(1, 120))
    def admit(self, positions):
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        fits = self.manager.can_admit(positions)
        got = self.manager.admit(seq_id, positions)
        assert (got is not None) == fits
        if got is None:
            self.refusals += 1
        else:
            self.positions[seq_id] = positions

    @precondition(lambda self: self.positions)
    @rule(data=st.data(), extra=st.integers(0, 100))
    def reserve(self, data, extra):
        seq_id = data.draw(st.sampled_from(sorted(self.positions)))
        before = list(self.manager.get(seq_id).blocks)
        free_before = self.manager.num_free_blocks
        ok = self.manager.reserve(seq_id, self.positions[seq_id] + extra)
        if ok:
            self.positions[seq_id] += extra
        else:                                          # refused: nothing changed
            self.refusals += 1
            assert self.manager.get(seq_id).blocks == before and self.manager.num_free_blocks == free_before

    @precondition(lambda self: self.positions)
    @rule(data=st.data())
    def release(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.positions)))
        self.manager.release(seq_id)
        del self.positions[seq_id]

    @invariant()
    def accounting_is_exact(self):
        m = self.manager
        blocks = [b for s in m.sequence_ids for b in m.get(s).blocks]
        slots = [m.get(s).slot for s in m.sequence_ids]
        assert len(blocks) == len(set(blocks)) and len(slots) == len(set(slots))       # nothing shared
        assert len(blocks) + m.num_free_blocks == m.num_total_blocks                     # nothing lost
        assert all(m.blocks.is_allocated(b) for b in blocks)
        for s, n in self.positions.items():
            assert len(m.get(s).blocks) == m.blocks_needed(n)                            # nothing leaked

    def teardown(self):
        for s in list(self.positions):
            self.manager.release(s)
        assert self.manager.num_free_blocks == 23 and self.manager.slots.num_free == 5


TestManager = ManagerMachine.TestCase
TestManager.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_bytes_per_token_match_the_spec_arithmetic():
    flash = plan_cache(preset("v4-flash"), Numerics.parse("reference"), 80 << 30, 64)
    # 21 CSA layers x (584 + 68) / 4 + 20 HCA layers x 584 / 128 (spec §6.4)
    assert flash.bytes_per_token == 21 * (584 + 68) / 4 + 20 * 584 / 128 == 3514.25
    pro = plan_cache(preset("v4-pro"), Numerics.parse("reference"), 80 << 30, 64)
    assert pro.bytes_per_token == 30 * (584 + 68) / 4 + 31 * 584 / 128
    # per-slot state: 44 window rings of 128 x 584 B, compressor states in fp32
    assert flash.bytes_per_slot == 44 * 128 * 584 + 21 * 2 * 4 * (8 * 1024 + 8 * 256) + 20 * 2 * 4 * 128 * 512
    assert flash.total_bytes <= 80 << 30 and flash.max_context_tokens == flash.num_blocks * 256
    assert flash.max_context_tokens > 20_000_000     # ~21M positions in 80 GiB at 3.5 KB per token


def test_a_budget_too_small_is_explained():
    with pytest.raises(ValueError, match="cannot hold 64 sequence slots"):
        plan_cache(preset("v4-flash"), Numerics.parse("reference"), 100 << 20, 64)
