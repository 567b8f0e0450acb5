import random

import pytest

from amoe_serve.kv.allocator import BlockAllocator, OutOfBlocks


def test_blocks_needed_and_accounting():
    a = BlockAllocator(10, 4)
    assert a.num_blocks == 10 and a.block_size == 4 and a.num_free == 10
    assert [a.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    t = a.allocate("r1", 9)
    assert len(t) == 3 and a.num_free == 7 and a.table("r1") is t
    assert a.allocate("r0", 0) == [] and set(a.owners()) == {"r1", "r0"}
    assert a.free("r1") == 3 and a.num_free == 10
    assert a.free("r1") == 0  # unknown owner: no-op
    assert a.free("r0") == 0 and a.owners() == []


def test_extend_at_block_boundaries():
    a = BlockAllocator(8, 4)
    t = a.allocate("r", 4)
    assert len(t) == 1
    assert a.extend("r", 4) is t and len(t) == 1  # exactly full: no new block
    a.extend("r", 5)
    assert len(t) == 2 and a.num_free == 6
    a.extend("r", 8)
    assert len(t) == 2
    a.extend("r", 9)
    assert len(t) == 3
    a.extend("r", 2)  # never shrinks
    assert len(t) == 3 and len(set(t)) == 3


def test_out_of_blocks_leaves_state_unchanged():
    a = BlockAllocator(3, 2)
    assert a.can_allocate(6) and not a.can_allocate(7)
    with pytest.raises(OutOfBlocks):
        a.allocate("big", 7)
    assert a.num_free == 3 and "big" not in a
    t = a.allocate("r", 4)
    with pytest.raises(OutOfBlocks):
        a.extend("r", 8)
    assert len(t) == 2 and a.num_free == 1
    assert issubclass(OutOfBlocks, RuntimeError)


def test_errors():
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)
    a = BlockAllocator(4, 2)
    a.allocate("r", 1)
    with pytest.raises(ValueError, match="already"):
        a.allocate("r", 1)
    with pytest.raises(ValueError, match="unknown"):
        a.extend("x", 3)
    with pytest.raises(ValueError, match="unknown"):
        a.table("x")
    with pytest.raises(ValueError):
        a.blocks_needed(-1)


def test_randomized_invariants():
    rnd = random.Random(0)
    a = BlockAllocator(64, 16)
    tokens = {}
    for step in range(5000):
        op = rnd.random()
        if op < 0.35:
            owner, n = step, rnd.randint(0, 100)
            if a.can_allocate(n):
                a.allocate(owner, n)
                tokens[owner] = n
            else:
                with pytest.raises(OutOfBlocks):
                    a.allocate(owner, n)
        elif op < 0.75 and tokens:
            owner = rnd.choice(list(tokens))
            n = tokens[owner] + rnd.randint(0, 40)
            try:
                a.extend(owner, n)
                tokens[owner] = n
            except OutOfBlocks:
                pass
        elif tokens:
            owner = rnd.choice(list(tokens))
            assert a.free(owner) == a.blocks_needed(tokens.pop(owner))
        # Invariants: no block owned twice, free + owned == all, tables cover tokens.
        owned = [b for o in a.owners() for b in a.table(o)]
        assert len(owned) == len(set(owned))
        assert len(owned) + a.num_free == a.num_blocks
        assert all(0 <= b < 64 for b in owned)
        for o, n in tokens.items():
            assert len(a.table(o)) == a.blocks_needed(n)
    for o in list(tokens):
        a.free(o)
    assert a.num_free == 64 and a.owners() == []
