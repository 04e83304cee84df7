"""``POST /api/v1/rollouts/rehearsal-profiles``: the devices a rollout rehearsal copies into twins, each with
its identity (tags, profile, hardware, the model it runs) and its recent inputs and outcomes from telemetry."""

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from edgefleet.core.rollout import TWIN_TAG
from edgefleet.server.store import Store


class ProfilesIn(BaseModel):
    """Which devices a rehearsal copies: those a rollout with this selection would reach (twins never)."""

    select: dict[str, str] = Field(default_factory=dict, max_length=64)
    profile: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=100, ge=1, le=10_000, description="at most this many, spread over the selection")
    since_s: float = Field(default=3600.0, ge=0, le=30 * 86400, description="telemetry of the last seconds")


class DeviceProfile(BaseModel):
    """What a twin needs to behave like this device."""

    device: str
    tags: dict[str, str]
    profile: str | None
    hardware: str | None
    running: str | None = Field(description="NAME@VERSION the device reports it runs")
    windows: int = Field(description="windows in its recent telemetry")
    accuracy: float | None = Field(description="correct / labelled in its recent telemetry")
    input_mean: list[float] | None = Field(
        description="per channel, raw units: its drift statistics through the running model's scaling")
    input_std: list[float] | None


def input_moments(batches: list[Any], mean: list[float], std: list[float]
                  ) -> tuple[list[float], list[float]] | None:
    """Per-channel raw mean and std of a device's recent inputs, from its batches' drift statistics (z units
    against the model's scaling ``mean``/``std``, weighted by the samples each covers); None without any."""
    channels = len(mean)
    n_total, sum_z, sum_z2 = 0, [0.0] * channels, [0.0] * channels
    for batch in batches:
        drift = batch.drift
        if drift is None or not drift.n or len(drift.mean_z) != channels or len(drift.std_ratio) != channels:
            continue
        n_total += drift.n
        for c, (mz, sr) in enumerate(zip(drift.mean_z, drift.std_ratio, strict=True)):
            sum_z[c] += drift.n * mz
            sum_z2[c] += drift.n * (sr * sr + mz * mz)
    if not n_total:
        return None
    mean_z = [v / n_total for v in sum_z]
    std_z = [max(0.0, v / n_total - m * m) ** 0.5 for v, m in zip(sum_z2, mean_z, strict=True)]
    return ([mu + sd * mz for mu, sd, mz in zip(mean, std, mean_z, strict=True)],
            [sd * sz for sd, sz in zip(std, std_z, strict=True)])


def rehearsal_router(store: Store) -> APIRouter:
    router = APIRouter()

    @router.post("/rehearsal-profiles")
    def rehearsal_profiles(body: ProfilesIn) -> list[DeviceProfile]:
        """The devices a rehearsal builds its twins from (``edgefleet rollout create --rehearse N``)."""
        chosen = [d for d in store.list_devices() if not d.revoked and TWIN_TAG not in d.tags
                  and (body.profile is None or d.profile == body.profile)
                  and all(d.tags.get(k) == v for k, v in body.select.items())]
        step = max(1.0, len(chosen) / body.limit)
        since = time.time() - body.since_s
        out = []
        for device in (chosen[int(i * step)] for i in range(min(body.limit, len(chosen)))):
            batches = store.telemetry(device.id, since)
            running = (device.reported or {}).get("running")
            model = store.model_by_ref(running) if running else None
            pre = (model.manifest.get("preprocess") or {}) if model is not None else {}
            moments = None
            if isinstance(pre.get("mean"), list) and isinstance(pre.get("std"), list):
                ours = [b for b in batches if b.model == running]
                moments = input_moments(ours, [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]])
            labelled = sum(b.labelled for b in batches)
            out.append(DeviceProfile(
                device=device.id, tags=dict(device.tags), profile=device.profile,
                hardware=getattr(device, "hardware", None), running=running,
                windows=sum(b.windows for b in batches),
                accuracy=sum(b.correct for b in batches) / labelled if labelled else None,
                input_mean=moments[0] if moments else None, input_std=moments[1] if moments else None))
        return out

    return router
