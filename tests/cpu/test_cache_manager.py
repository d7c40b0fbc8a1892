"""Block/slot allocation and cache sizing: property-based tests of the allocator and the manager."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dsv4.cache.allocator import IdAllocator
from dsv4.cache.manager import KVCacheManager
from dsv4.cache.prefix import prefix_keys
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


# ---------------------------------------------------------------------------------------------- prefix caching
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6, 0, 0], [7, 7, 7, 7, 7, 7, 7, 7]]


class PrefixManagerMachine(RuleBasedStateMachine):
    """Admissions over prompts that share prefixes (blocks of 2 tokens), prefixes registered as their steps
    complete, releases, eviction pressure, a few snapshots, flushes: a block's holder count is the number of
    sequences listing it, no block is both free and held or cached, every block is free, held or cached-unused,
    and eviction never takes a held block."""

    def __init__(self):
        super().__init__()
        self.manager = KVCacheManager(num_slots=4, num_blocks=12, block_size=2, num_snapshots=3)
        self.seqs: dict[str, list[int]] = {}        # admitted sequence -> its prompt
        self.next_id = 0

    @rule(prompt=st.sampled_from(range(len(PROMPTS))), cut=st.integers(2, 8))
    def admit(self, prompt, cut):
        tokens = PROMPTS[prompt][:cut]
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        keys = prefix_keys(tokens, 2)[:(len(tokens) - 1) // 2]       # at least one token left to run
        got = self.manager.admit(seq_id, len(tokens), keys)
        if got is not None:
            self.seqs[seq_id] = tokens
            assert got.num_cached_blocks <= len(keys) and (got.snapshot is None) == (got.num_cached_blocks == 0)
            assert len(got.blocks) == max(self.manager.blocks_needed(len(tokens)), got.num_cached_blocks)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def register(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        keys = prefix_keys(self.seqs[seq_id], 2)
        if keys:
            n = data.draw(st.integers(1, len(keys)))
            snapshot = self.manager.prefix.new_snapshot()
            if snapshot is not None:
                self.manager.cache_prefix(seq_id, keys[:n], snapshot)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def release(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.manager.release(seq_id)
        del self.seqs[seq_id]

    @rule()
    def flush(self):
        self.manager.clear_prefix_cache()

    @invariant()
    def accounting_is_exact(self):
        m, prefix = self.manager, self.manager.prefix
        listed = [b for s in m.sequence_ids for b in m.get(s).blocks]
        held = set(listed)
        for b in range(m.num_total_blocks):
            assert m.holders(b) == listed.count(b)
            free = not m.blocks.is_allocated(b)
            assert not (free and (b in held or prefix.is_cached(b)))
            assert free or b in held or prefix.is_cached(b)                   # nothing lost
        unused = [b for b in range(m.num_total_blocks) if prefix.is_cached(b) and b not in held]
        assert prefix.num_unused == len(unused)
        assert m.num_free_blocks == m.blocks.num_free + len(unused)
        assert prefix.snapshots.num_used <= 3

    def teardown(self):
        for s in list(self.seqs):
            self.manager.release(s)
        self.manager.clear_prefix_cache()
        assert self.manager.num_free_blocks == 12 == self.manager.blocks.num_free
        assert self.manager.prefix.snapshots.num_used == 0


TestPrefixManager = PrefixManagerMachine.TestCase
TestPrefixManager.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_a_cached_prefix_is_shared_and_resumed_only_where_a_snapshot_is():
    manager = KVCacheManager(num_slots=3, num_blocks=10, block_size=2, num_snapshots=2)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    keys = prefix_keys(prompt, 2)                                   # 3 full blocks
    first = manager.admit("a", 8, keys)
    assert first.num_cached_blocks == 0 and first.snapshot is None
    snapshot = manager.prefix.new_snapshot()
    assert manager.cache_prefix("a", keys[:2], snapshot)             # blocks 0-1 and the state after them
    second = manager.admit("b", 8, keys)
    assert second.num_cached_blocks == 2 and second.snapshot == snapshot
    assert second.blocks[:2] == first.blocks[:2] and manager.holders(first.blocks[0]) == 2
    other = manager.admit("c", 8, prefix_keys([1, 2, 9, 9, 9, 9, 9], 2))
    assert other.num_cached_blocks == 0                               # block 0 matches, but no snapshot after it
    manager.release("a")
    manager.release("b")
    assert manager.prefix.num_unused == 2 and manager.num_free_blocks == 10 - len(other.blocks)
    manager.release("c")
    assert manager.admit("d", 20).blocks and manager.prefix.num_cached == 0     # taking all evicted the cache
