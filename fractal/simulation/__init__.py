"""What-if simulation of the fleet: replay a demand trace through the real scaler and assignment code on a
virtual clock and a throwaway database (see docs/simulation.md)."""

from fractal.simulation.cloud import BootDistribution, SimulatedCloud
from fractal.simulation.engine import (
    PRICES_USD_PER_HOUR,
    Policy,
    RegionResult,
    Sample,
    Simulation,
    SimulationConfig,
    SimulationResult,
    compare,
    simulate,
)
from fractal.simulation.trace import (
    SessionRequest,
    Spike,
    SyntheticSpec,
    export_events,
    read_csv,
    synthetic_trace,
    write_csv,
)

__all__ = [
    "PRICES_USD_PER_HOUR",
    "BootDistribution",
    "Policy",
    "RegionResult",
    "Sample",
    "SessionRequest",
    "SimulatedCloud",
    "Simulation",
    "SimulationConfig",
    "SimulationResult",
    "Spike",
    "SyntheticSpec",
    "compare",
    "export_events",
    "read_csv",
    "simulate",
    "synthetic_trace",
    "write_csv",
]
