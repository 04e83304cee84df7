"""Which devices a bundle fits: its manifest's hardware ids and device profiles against each device's.

Pure, like the rest of core. A rollout's selection (tags, profile) picks devices; of those, the ones the
candidate does not fit are left out of the rollout and listed with the reason (the rollout's ``skipped``):

- hardware: a manifest naming hardware ids (``bundle pack --hardware``) fits only devices of one of them (an
  empty list fits any); the device refuses it anyway (``core.update``, reason ``wrong_hardware``).
- profile: a manifest naming the profiles it fits (``build`` signs them) fits only devices of one of them (an
  empty list is not judged); a device provisioned without a profile is judged on its hardware only.
- runtime: a manifest naming a runtime (``onnxruntime`` when it names none) fits only devices that report that
  runtime (a device that reports none is not judged); the device refuses it anyway (reason ``missing_runtime``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgefleet.bundle.runtimes import DEFAULT_RUNTIME
from edgefleet.core.rollout import DeviceView, RolloutPlan, select_targets
from edgefleet.errors import ConfigError

GENERIC_HARDWARE = "generic"
"""The hardware id of a device provisioned without one."""


def misfit(device: DeviceView, hardware: Sequence[str], profiles: Sequence[str], runtime: str | None = None
           ) -> str | None:
    """Why a bundle for ``hardware`` that fits ``profiles`` and runs on ``runtime`` does not fit ``device``; None
    when it fits."""
    if hardware and device.hardware not in hardware:
        return f"hardware {device.hardware} is not among the bundle's ({', '.join(hardware)})"
    if profiles and device.profile is not None and device.profile not in profiles:
        return f"profile {device.profile} is not among those the bundle fits ({', '.join(profiles)})"
    needed = runtime or DEFAULT_RUNTIME
    if device.runtimes is not None and needed not in device.runtimes:
        return f"runtime {needed} is not among the device's ({', '.join(sorted(device.runtimes)) or 'none'})"
    return None


def fit_targets(plan: RolloutPlan, devices: Mapping[str, DeviceView], manifest: Mapping[str, Any]
                ) -> tuple[dict[str, DeviceView], list[dict[str, str]]]:
    """``devices`` less those the plan selects that the candidate's ``manifest`` does not fit, and those as
    ``{device, reason}``. ConfigError when the plan selects devices and the candidate fits none of them."""
    hardware = [str(h) for h in manifest.get("hardware") or []]
    profiles = [str(p) for p in manifest.get("profiles") or []]
    runtime = str(manifest["runtime"]) if manifest.get("runtime") else None
    skipped = []
    for device_id in sorted(select_targets(plan, devices.values(), "")):
        reason = misfit(devices[device_id], hardware, profiles, runtime)
        if reason is not None:
            skipped.append({"device": device_id, "reason": reason})
    left_out = {s["device"] for s in skipped}
    kept = {k: v for k, v in devices.items() if k not in left_out}
    if skipped and not select_targets(plan, kept.values(), ""):
        shown = "; ".join(f"{s['device']}: {s['reason']}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise ConfigError(f"{plan.candidate} fits none of the {len(skipped)} selected device(s): {shown}{more}")
    return kept, skipped
