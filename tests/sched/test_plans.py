"""The shared decision code: replica row shares equal the real dispatch's per-row cut, and the
expert step groups a block's queues under the row budget with the pick first."""
from types import SimpleNamespace

import torch

from amoe_serve.engine.attention_core import AttentionCore
from amoe_serve.sched.expert_plan import drain_block_step, next_expert_step
from amoe_serve.sched.policies import make_scheduler
from amoe_serve.sched.queues import MuQueues
from amoe_serve.sched.replicas import replica_shares


def test_replica_shares_equal_attention_core_owners():
    E = 3
    g = torch.Generator().manual_seed(0)
    n_BE = torch.tensor([[1, 2, 3]])
    ranks_BEM = torch.tensor([[[0, 0, 0], [1, 2, 0], [2, 0, 1]]])
    core = SimpleNamespace(spec=SimpleNamespace(num_experts=E), n_BE=n_BE, ranks_BEM=ranks_BEM)
    for R in (1, 5, 17, 40):
        expert_R = torch.randint(0, E, (R,), generator=g)
        owner_R = AttentionCore._owners(core, 0, expert_R)
        for e in range(E):
            count = int((expert_R == e).sum())
            parts = replica_shares(count, int(n_BE[0, e]))
            got = [int(((expert_R == e) & (owner_R == int(ranks_BEM[0, e, i]))).sum()) for i in range(int(n_BE[0, e]))]
            assert got == parts


def test_expert_step_groups_block_with_pick_first_under_budget():
    q = MuQueues(2, 3)
    q.push(1, 0, "a", 5)
    q.push(1, 2, "b", 30)
    q.push(1, 2, "c", 30)
    q.push(0, 1, "d", 1)
    step = next_expert_step(q, make_scheduler("mtfs"), max_batch=40, group_block=True)
    assert step.block == 1 and step.slots == [2, 0] and step.rows == [30, 5] and step.items == [["b"], ["a"]]
    assert q.lengths[1].tolist() == [0, 0, 30]
    rest = drain_block_step(q, 1)
    assert rest.slots == [2] and rest.rows == [30]
    assert next_expert_step(q, make_scheduler("mtfs"), 40, False).block == 0
    assert next_expert_step(q, make_scheduler("mtfs"), 40, False) is None


def test_expert_gate_holds_a_thin_block_until_rows_or_wait():
    import numpy as np

    from amoe_serve.sched.expert_plan import ExpertGate, next_expert_step
    from amoe_serve.sched.policies import make_scheduler
    from amoe_serve.sched.queues import MuQueues

    q = MuQueues(2, 2)
    gate = ExpertGate(2, min_rows=8, max_wait_s=0.010)
    sched = make_scheduler("defrag", 3, 0.8)
    q.push(0, 0, "a", 3)
    gate.pushed(0, now=1.000)
    assert next_expert_step(q, sched, 512, True, gate, now=1.005) is None  # 3 rows < 8, waited 5 ms
    assert gate.next_deadline() == 1.010
    q.push(0, 1, "b", 5)
    gate.pushed(0, now=1.006)  # the block's oldest row still dates from 1.000
    step = next_expert_step(q, sched, 512, True, gate, now=1.006)  # 8 rows: runs, both queues grouped
    assert step.block == 0 and sorted(step.rows) == [3, 5] and gate.since_B[0] == np.inf
    q.push(1, 0, "c", 1)
    gate.pushed(1, now=2.0)
    assert next_expert_step(q, sched, 512, True, gate, now=2.009) is None
    assert next_expert_step(q, sched, 512, True, gate, now=gate.next_deadline()).rows == [1]  # waited long enough
    # Off (min_rows 0): whatever landed runs, as without a gate.
    q.push(1, 1, "d", 1)
    assert next_expert_step(q, sched, 512, True, ExpertGate(2), now=0.0).rows == [1]
