"""Device profiles (a built-in table and user YAML) and the feasibility check of a model against them.

Pure: values in, verdicts out. The built-in figures are order-of-magnitude descriptions of device classes
(the low end of each class's memory, a sustained multiply-accumulate rate for int8 and float kernels, a typical
power draw in use), not measurements of one product. Latency from MACs is an estimate and says so.

A profile lists only runtimes the agent has (:data:`~edgefleet.bundle.runtimes.RUNTIMES`: ``onnxruntime``,
``openvino``, ``litert``) and, for ONNX Runtime, the execution providers to prefer where the device's ONNX Runtime
build has them (``runtime.runner.onnxruntime_providers``; the CPU provider is always the fallback). Microcontroller
classes list ``litert``: their model is the int8 ``.tflite`` that TFLite Micro runs, checked on the build host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.bundle.runtimes import RUNTIMES
from edgefleet.errors import ConfigError

KB, MB, GB = 1024, 1024**2, 1024**3


class DeviceProfile(BaseModel):
    """One device class: memory, storage, compute rate, latency budget, power and runtimes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    description: str = ""
    ram_bytes: int = Field(gt=0, description="memory at the low end of the class")
    usable_ram_fraction: float = Field(default=0.5, gt=0, le=1, description="share left to the model by OS and app")
    storage_bytes: int = Field(gt=0, description="flash or disk available for the model file")
    int8_macs_per_s: float = Field(gt=0, description="sustained int8 multiply-accumulates per second")
    float_macs_per_s: float = Field(gt=0, description="sustained float32 multiply-accumulates per second")
    latency_budget_ms: float = Field(gt=0)
    power_w: float = Field(gt=0, description="typical power while computing")
    runtimes: tuple[str, ...] = Field(default=("onnxruntime",), min_length=1)
    providers: tuple[str, ...] = Field(default=(), description="ONNX Runtime execution providers to prefer, in order")

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime {unknown[0]!r} (known: {', '.join(RUNTIMES)})")
        return value


def _p(name: str, description: str, ram: int, storage: int, int8: float, fp32: float, budget: float, power: float,
       runtimes: tuple[str, ...], usable: float = 0.5, providers: tuple[str, ...] = ()) -> DeviceProfile:
    return DeviceProfile(name=name, description=description, ram_bytes=ram, usable_ram_fraction=usable,
                         storage_bytes=storage, int8_macs_per_s=int8, float_macs_per_s=fp32,
                         latency_budget_ms=budget, power_w=power, runtimes=runtimes, providers=providers)


_MCU_RUNTIMES = ("litert",)
_ARM_RUNTIMES = ("onnxruntime", "litert")
_X86_OR_ARM_RUNTIMES = ("onnxruntime", "litert", "openvino")
BUILTIN_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    _p("heart-monitor", "embedded heart monitor: 256 KB-1 MB RAM, 10-50 MHz MCU, 0.1-0.5 W", 256 * KB, 1 * MB,
       2e7, 2e6, 1000.0, 0.3, _MCU_RUNTIMES, usable=0.75),
    _p("microcontroller", "Cortex-M class (M4/M7, ESP32, RP2040): 256 KB-2 MB RAM, milliwatts", 256 * KB, 2 * MB,
       2e8, 2.5e7, 100.0, 0.1, _MCU_RUNTIMES, usable=0.75),
    _p("smartwatch", "smartwatch: 0.5-1 GB RAM, 100-500 MHz ARM Cortex-A, 1-2 W", 512 * MB, 4 * GB,
       1e9, 2.5e8, 50.0, 1.5, _ARM_RUNTIMES),
    _p("smart-camera", "smart camera: 256 MB-2 GB RAM, 0.5-1.5 GHz SoC/ASIC, 5-10 W", 256 * MB, 1 * GB,
       4e9, 1e9, 33.0, 7.5, _X86_OR_ARM_RUNTIMES),
    _p("drone", "drone: 1-2 GB RAM, 1-2 GHz quad-core ARM, 20-50 W in flight", 1 * GB, 8 * GB,
       1.5e10, 4e9, 20.0, 35.0, _ARM_RUNTIMES),
    _p("raspberry-pi", "Raspberry-Pi class application processor: 1-8 GB RAM, quad Cortex-A, 2-15 W", 1 * GB,
       16 * GB, 2e10, 5e9, 100.0, 6.0, _X86_OR_ARM_RUNTIMES),
    _p("jetson-orin-nano", "Jetson-Orin-Nano class edge accelerator: 4-16 GB, 5-25 W", 4 * GB, 64 * GB,
       1e12, 2e11, 10.0, 15.0, _ARM_RUNTIMES, providers=("TensorrtExecutionProvider", "CUDAExecutionProvider")),
)}


@dataclass(frozen=True)
class Footprint:
    """What the feasibility check needs to know about one model."""

    file_bytes: int
    weight_bytes: int
    arena_bytes: int
    macs: int
    int8_fraction: float
    energy_uj: float
    runtime: str = "onnxruntime"


@dataclass(frozen=True)
class Verdict:
    """Whether a model fits one profile, the estimates behind it, and every reason when it does not."""

    profile: str
    fits: bool
    fits_storage: bool
    fits_ram: bool
    meets_latency: bool
    runtime_supported: bool
    ram_needed_bytes: int
    ram_available_bytes: int
    est_latency_ms: float
    latency_budget_ms: float
    energy_uj: float
    device_energy_mj: float
    reasons: list[str] = field(default_factory=list)
    latency_source: str = "estimate"
    """``estimate``: MACs over the profile's rates; ``measured``: the build host's latency times the scaling the
    profile's devices measured (edgefleet.server.measured)."""


def _size(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", MB), ("KB", KB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def estimate_latency_ms(profile: DeviceProfile, macs: int, int8_fraction: float) -> float:
    """MACs split by precision divided by the profile's sustained rates, in milliseconds."""
    int8 = macs * int8_fraction
    return 1e3 * (int8 / profile.int8_macs_per_s + (macs - int8) / profile.float_macs_per_s)


def check(profile: DeviceProfile, model: Footprint, measured_latency_ms: float | None = None) -> Verdict:
    """The feasibility of ``model`` on ``profile``: storage, RAM (weights + arena), latency (``measured_latency_ms``
    where the profile's devices measured it, else estimated from MACs), runtime."""
    ram_needed = model.weight_bytes + model.arena_bytes
    ram_available = int(profile.ram_bytes * profile.usable_ram_fraction)
    measured = measured_latency_ms is not None
    latency = measured_latency_ms if measured_latency_ms is not None else estimate_latency_ms(
        profile, model.macs, model.int8_fraction)
    checks = {
        "storage": (model.file_bytes <= profile.storage_bytes,
                    f"model file {_size(model.file_bytes)} exceeds storage {_size(profile.storage_bytes)}"),
        "ram": (ram_needed <= ram_available,
                f"weights + arena {_size(ram_needed)} exceed usable RAM {_size(ram_available)}"),
        "latency": (latency <= profile.latency_budget_ms,
                    f"{'measured' if measured else 'estimated'} latency {latency:.3g} ms exceeds the budget "
                    f"{profile.latency_budget_ms:g} ms"),
        "runtime": (model.runtime in profile.runtimes,
                    f"runtime {model.runtime} is not supported (supported: {', '.join(profile.runtimes)})"),
    }
    reasons = [message for ok, message in checks.values() if not ok]
    return Verdict(profile=profile.name, fits=not reasons, fits_storage=checks["storage"][0],
                   fits_ram=checks["ram"][0], meets_latency=checks["latency"][0],
                   runtime_supported=checks["runtime"][0],
                   ram_needed_bytes=ram_needed, ram_available_bytes=ram_available, est_latency_ms=latency,
                   latency_budget_ms=profile.latency_budget_ms, energy_uj=model.energy_uj,
                   device_energy_mj=profile.power_w * latency, reasons=reasons,
                   latency_source="measured" if measured else "estimate")


def parse_profiles(text: str) -> dict[str, DeviceProfile]:
    """User profiles from YAML: a list of profile mappings, or ``{profiles: [...]}``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"profiles file is not valid YAML: {exc}") from exc
    items = data.get("profiles") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError("profiles file must be a list of profiles (or a mapping with a 'profiles' list)")
    out: dict[str, DeviceProfile] = {}
    for i, item in enumerate(items):
        try:
            profile = DeviceProfile.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(f"profile {i}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
        out[profile.name] = profile
    return out


def resolve(names: list[str], user: dict[str, DeviceProfile] | None = None) -> list[DeviceProfile]:
    """Profiles by name, user profiles overriding built-ins; ConfigError for an unknown name."""
    table = {**BUILTIN_PROFILES, **(user or {})}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown profile {', '.join(unknown)}; known: {', '.join(sorted(table))}")
    return [table[n] for n in names]
