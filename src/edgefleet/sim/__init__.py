"""Fleet simulator: many devices in one process over the real protocols (see :mod:`edgefleet.sim.fleet`)."""

from edgefleet.sim.fleet import SimDevice, SimFleet

__all__ = ["SimDevice", "SimFleet"]
