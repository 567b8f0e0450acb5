"""The simulator's engines, by import path: AEP (`aep.py`, the ranks' own decision code as
events) and lockstep (`lockstep.py`, a barrier per block), with their shared pieces."""
from .aep import AepSim, SimSegment, simulate_aep
from .events import Cores, EventLoop, Net, makespan
from .lockstep import LockstepSim, simulate_lockstep
from .noise import Noise, NoiseConfig
from .params import SimParams
from .stats import SimGateway, Stats
from .workload import Router, Workload, make_workload, popularity

__all__ = ["AepSim", "SimSegment", "simulate_aep", "Cores", "EventLoop", "Net", "makespan", "LockstepSim",
           "simulate_lockstep", "Noise", "NoiseConfig", "SimParams", "SimGateway", "Stats", "Router", "Workload",
           "make_workload", "popularity"]
