"""Per-operation time noise and stragglers.

Every simulated operation's time is multiplied by a lognormal factor of mean 1 and coefficient
of variation `cv` (sigma^2 = ln(1 + cv^2)), drawn independently per operation; a slow GPU's times
are also multiplied by (1 + slow). Lockstep pays the maximum over ranks at every block (its
barrier), AEP only its own ranks' times.

Default cv 5%: the issue's figure. What this repo measured: the spread of repeated expert and
attention steps on this CPU machine (`amoe_serve.sim.calibrate`, `op_cv` in the local table) and,
when it has run, on a GPU (`scripts/gpu-calibrate.sh` writes the measured `op_cv`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class NoiseConfig:
    cv: float = 0.05                    # per-operation coefficient of variation (0 = none)
    slow_gpus: list[int] = field(default_factory=list)   # GPU ids that are slower
    slow_factor: float = 0.0            # their extra time, e.g. 0.2 = 20% slower
    seed: int = 0


class Noise:
    def __init__(self, cfg: NoiseConfig, num_gpus: int) -> None:
        self.cv = cfg.cv
        s2 = math.log1p(cfg.cv ** 2)
        self.sigma, self.mu = math.sqrt(s2), -s2 / 2.0   # E[factor] = 1
        self.slow_G = np.ones(num_gpus)
        for g in cfg.slow_gpus:
            if 0 <= g < num_gpus:
                self.slow_G[g] = 1.0 + cfg.slow_factor
        self.rng = np.random.default_rng(cfg.seed + 12345)
        self._buf = np.zeros(0)
        self._i = 0

    def _draw(self) -> float:
        if self._i >= self._buf.size:  # draws in blocks: one numpy call per 4096 operations
            self._buf = self.rng.lognormal(self.mu, self.sigma, 4096)
            self._i = 0
        v = self._buf[self._i]
        self._i += 1
        return float(v)

    def scale(self, gpu: int, t: float) -> float:
        if t <= 0:
            return t
        f = self.slow_G[gpu]
        return t * f * self._draw() if self.cv > 0 else t * f

    def scale_G(self, gpus: np.ndarray, t_G: np.ndarray) -> np.ndarray:
        f = self.slow_G[gpus]
        if self.cv > 0:
            f = f * self.rng.lognormal(self.mu, self.sigma, len(t_G))
        return t_G * f
