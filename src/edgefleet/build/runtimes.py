"""Every candidate timed on every runtime installed on the build host, and the runtime chosen per device profile.

ONNX Runtime and OpenVINO run the candidate's ONNX model as it is; LiteRT runs a ``.tflite`` form where the
caller has one (:mod:`edgefleet.build.tflite`). The runners are timed in interleaved rounds, so load from
other processes hits them alike. A profile's runtime is the fastest measured one among those it lists; a
bundle names one runtime: ``auto`` takes the one every target profile chose (ONNX Runtime where they differ or
where the choice needs another model format than the candidate's).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from edgefleet.build.latency import LatencyStats, _stats, batch_of
from edgefleet.bundle.runtimes import DEFAULT_RUNTIME, MODEL_FORMATS, RUNTIMES
from edgefleet.core.profiles import DeviceProfile
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.runtime.runner import BaseRunner, installed_runtimes, make_runner

AUTO = "auto"


def open_runners(onnx_model: bytes, runtimes: Sequence[str] | None = None, *, tflite: bytes | None = None,
                 threads: int = 1) -> tuple[dict[str, BaseRunner], dict[str, str]]:
    """Runners for the model on each of ``runtimes`` (default: every one installed) that has the model's format,
    and why each other one could not run it."""
    wanted = installed_runtimes() if runtimes is None else tuple(runtimes)
    runners: dict[str, BaseRunner] = {}
    errors: dict[str, str] = {}
    for name in wanted:
        model = tflite if MODEL_FORMATS.get(name) == "tflite" else onnx_model
        if model is None:
            continue
        try:
            runners[name] = make_runner(model, name, threads=threads)
        except EdgefleetError as exc:
            errors[name] = str(exc)
    return runners, errors


def time_runners(runners: Mapping[str, BaseRunner], x: np.ndarray, batch: int = 1, *, rounds: int = 5,
                 runs: int = 10, warmup: int = 3) -> dict[str, LatencyStats]:
    """Median latency per runner on ``batch`` samples of ``x``, in ``rounds`` interleaved rounds of ``runs`` (a
    runner that fails on the batch is left out)."""
    feed = batch_of(x, batch)
    working = {}
    for name, runner in runners.items():
        try:
            for _ in range(warmup):
                runner.run(feed)
        except EdgefleetError:
            continue  # this runtime cannot run the model: it has no latency
        working[name] = runner
    samples: dict[str, list[float]] = {name: [] for name in working}
    for _ in range(rounds):
        for name, runner in working.items():
            for _ in range(runs):
                start = time.perf_counter()
                runner.run(feed)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _stats(batch, values) for name, values in samples.items()}


def time_runtimes(onnx_model: bytes, x: np.ndarray, *, runtimes: Sequence[str] | None = None,
                  tflite: bytes | None = None, batch: int = 1, threads: int = 1, rounds: int = 5,
                  runs: int = 10) -> dict[str, LatencyStats]:
    """:func:`open_runners` then :func:`time_runners`: the latency of one candidate on each runtime here."""
    runners, _ = open_runners(onnx_model, runtimes, tflite=tflite, threads=threads)
    return time_runners(runners, x, batch, rounds=rounds, runs=runs)


def runtime_per_profile(profiles: Sequence[DeviceProfile], latency: Mapping[str, LatencyStats]
                        ) -> dict[str, str | None]:
    """For each profile, the fastest measured runtime among those it lists (None: none of them was measured)."""
    chosen: dict[str, str | None] = {}
    for profile in profiles:
        measured = [name for name in profile.runtimes if name in latency]
        chosen[profile.name] = min(measured, key=lambda n: latency[n].median_ms) if measured else None
    return chosen


def bundle_runtime(requested: str, profiles: Sequence[DeviceProfile], latency: Mapping[str, LatencyStats],
                   model_format: str = "onnx") -> tuple[str, str]:
    """The runtime the bundle names and why: ``requested`` itself (a LiteRT bundle ships the TFLite export, see
    :func:`edgefleet.build.product.build_bundle`), or for ``auto`` the runtime every profile chose
    (:func:`runtime_per_profile`) when they agree on one that reads ``model_format``, else ONNX Runtime."""
    if requested != AUTO:
        if requested not in RUNTIMES:
            raise ConfigError(f"unknown runtime {requested!r} (known: {AUTO}, {', '.join(RUNTIMES)})")
        return requested, "asked for"
    choices = set(runtime_per_profile(profiles, latency).values())
    if len(choices) == 1:
        (only,) = choices
        if only is not None and MODEL_FORMATS[only] == model_format:
            return only, f"the fastest measured runtime of every target profile ({', '.join(p.name for p in profiles)})"
    return DEFAULT_RUNTIME, "the target profiles chose different runtimes (or none measured): the default"
