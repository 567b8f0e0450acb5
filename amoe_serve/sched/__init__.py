"""Pure-logic AEP scheduling: μ-queues, queue-selection policies, top-k merge pool.

No MPI, transport, model or wall-clock reads here, so a discrete-event simulator
can reuse these classes unchanged. TokenPool (amoe_serve.sched.token_pool) needs
torch, so it is not imported here: the simulator can import the package torch-free.
"""
from .policies import FLFS, MTFS, POLICIES, Defrag, Scheduler, make_scheduler, pick_block_group
from .queues import MuQueues

__all__ = [
    "FLFS", "MTFS", "POLICIES", "Defrag", "Scheduler", "make_scheduler", "pick_block_group",
    "MuQueues",
]
