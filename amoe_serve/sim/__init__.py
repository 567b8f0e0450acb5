"""Discrete-event cluster simulator of AEP vs lockstep MoE serving (`amoe-serve sim`).

Drives the same μ-queues (`amoe_serve.sched.queues.MuQueues`) and schedulers
(`amoe_serve.sched.policies.make_scheduler`) as the real ranks, with a per-operation cost
model (`cost.py`). Importing it does not import torch (only `calibrate` needs it).
"""
from .sim_config import SimConfig, load_sim_config
from .cost import TABLES, CostModel, DeviceTable, load_table
from .run import run_and_write, run_one, run_sim

__all__ = ["SimConfig", "load_sim_config", "TABLES", "CostModel", "DeviceTable", "load_table",
           "run_and_write", "run_one", "run_sim"]
