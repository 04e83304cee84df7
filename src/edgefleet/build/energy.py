"""An energy estimate per inference from per-operation energies (45 nm figures, picojoules).

It is an estimate, not a measurement: it counts arithmetic by precision and memory traffic under stated
assumptions, and ignores control, instruction fetch, caches and leakage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: pJ per operation at 45 nm (the default table)
ENERGY_PJ_45NM: dict[str, float] = {
    "add_int8": 0.03, "add_int16": 0.05, "add_int32": 0.1, "add_fp16": 0.4, "add_fp32": 0.9,
    "mult_int8": 0.2, "mult_int32": 3.1, "mult_fp16": 1.1, "mult_fp32": 3.7,
    "sram_read_32b": 5.0, "dram_read_32b": 640.0,
}

ASSUMPTIONS = (
    "estimate from a 45 nm per-operation energy table, not a measurement",
    "a MAC is one multiply and one add; int8 MACs multiply in 8 bit and accumulate in 32 bit",
    "elementwise adds/multiplies use the node's precision; transcendental ops count as a few multiplies",
    "weights are read once per inference from DRAM (32-bit words)",
    "activations are read once per consumer and written once, from an 8 KB-class SRAM (32-bit words)",
    "control, instruction fetch, caches and leakage are ignored",
)


@dataclass
class OpCounts:
    """Arithmetic counts per precision ("int8", "fp16", "fp32", "other")."""

    macs: dict[str, int] = field(default_factory=dict)
    adds: dict[str, int] = field(default_factory=dict)
    mults: dict[str, int] = field(default_factory=dict)

    def add(self, precision: str, *, macs: int = 0, adds: int = 0, mults: int = 0) -> None:
        """Add one node's counts at ``precision``."""
        for table, value in ((self.macs, macs), (self.adds, adds), (self.mults, mults)):
            table[precision] = table.get(precision, 0) + value


@dataclass(frozen=True)
class EnergyEstimate:
    """Estimated energy of one inference, in microjoules, split into compute and memory."""

    compute_uj: float
    dram_uj: float
    sram_uj: float
    assumptions: tuple[str, ...] = ASSUMPTIONS

    @property
    def total_uj(self) -> float:
        """Compute plus memory, in microjoules."""
        return self.compute_uj + self.dram_uj + self.sram_uj


def _unit(kind: str, precision: str, table: dict[str, float]) -> float:
    if precision == "int8":
        return table[f"{kind}_int8"]
    if precision == "fp16":
        return table[f"{kind}_fp16"]
    if precision == "fp32":
        return table[f"{kind}_fp32"]
    return table[f"{kind}_int32"]


def estimate_energy(
    counts: OpCounts, *, weight_bytes: int, activation_bytes: int, table: dict[str, float] | None = None
) -> EnergyEstimate:
    """Energy of one inference: arithmetic by precision, weights from DRAM once, activations from SRAM."""
    t = table or ENERGY_PJ_45NM
    compute = 0.0
    for precision, macs in counts.macs.items():
        accumulate = t["add_int32"] if precision == "int8" else _unit("add", precision, t)
        compute += macs * (_unit("mult", precision, t) + accumulate)
    compute += sum(n * _unit("add", p, t) for p, n in counts.adds.items())
    compute += sum(n * _unit("mult", p, t) for p, n in counts.mults.items())
    dram = -(-weight_bytes // 4) * t["dram_read_32b"]
    sram = -(-activation_bytes // 4) * t["sram_read_32b"]
    return EnergyEstimate(compute_uj=compute * 1e-6, dram_uj=dram * 1e-6, sram_uj=sram * 1e-6)
