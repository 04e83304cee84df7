"""What the device is, measured once at start and reported with its state (``DeviceFacts``): CPU model,
architecture, cores, memory, the runtime packages installed and ONNX Runtime's execution providers.

Nothing is imported to learn it: runtime versions come from the installed distributions' metadata (importing
OpenVINO would hold its libraries in the agent's memory for its whole uptime), the providers from the ONNX
Runtime module the agent has loaded already. The server joins these facts with the latency the device's
telemetry measures per model (edgefleet.server.measured).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

RUNTIME_DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
                         "openvino": ("openvino",), "litert": ("ai-edge-litert",)}
"""Runtime name -> the distributions that bring it (the first installed one gives the version)."""


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo's ``model name``, or ``Model`` on ARM boards)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return platform.processor() or None
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()[:128]
    return platform.processor() or None


def memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Physical memory in MB (Linux: /proc/meminfo's MemTotal)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def runtime_versions() -> dict[str, str]:
    """Each runtime whose package is installed, with its version."""
    out: dict[str, str] = {}
    for runtime, distributions in RUNTIME_DISTRIBUTIONS.items():
        for name in distributions:
            try:
                out[runtime] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def onnxruntime_providers() -> list[str]:
    """ONNX Runtime's available execution providers (the agent has ONNX Runtime loaded already)."""
    try:
        import onnxruntime

        return [str(p) for p in onnxruntime.get_available_providers()][:16]
    except (ImportError, RuntimeError):
        return []


def device_facts() -> dict[str, Any]:
    """The facts as ``DeviceFacts`` takes them (absent where unknown)."""
    facts: dict[str, Any] = {"cpu": cpu_model(), "machine": platform.machine()[:32] or None,
                             "cores": os.cpu_count(), "memory_mb": memory_mb(),
                             "runtimes": runtime_versions(), "providers": onnxruntime_providers()}
    return {k: v for k, v in facts.items() if v not in (None, {}, [])}
