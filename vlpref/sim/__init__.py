"""A simulated OpenAI-compatible server: a test double for offline tests and benchmarks.

It answers chat completions from deterministic personas (see `vlpref.sim.personas`), injects
faults and latency on demand, and exposes counters. It is not a model.
"""

from vlpref.sim.config import SimConfig, load_config
from vlpref.sim.testing import SimServer, SimServerError

__all__ = ["SimConfig", "SimServer", "SimServerError", "load_config"]
