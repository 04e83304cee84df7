"""Agent benchmark, local action and trigger gating (E11 items 3 and 4), run from :mod:`bench.bench_agent`.

local_action: the demo model on the demo's 6 channels streamed sample by sample at 1 kHz (a live sensor: every
sample its own block), each window's outcome delivered to a Unix datagram socket; a consumer in another process
stamps each message as it arrives (CLOCK_MONOTONIC, shared by the processes). Latency: from the moment the
window's last sample is handed to the pipeline to the consumer's receipt; the model's own latency (the run
alone) is reported beside it, and the target is p99 <= 5 ms plus the model's p99.
trigger: the vibration source (one channel at 2 kHz, windows of 256) with a bearing fault 5% of the time (1 s in
every 20 s), a small 1D CNN on each window with and without a ``peak`` trigger (1 g, hold 1); thread CPU time
of the pipeline over the same stream, alternating, medians of 3 rounds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.inference import InferencePipeline
from edgefleet.agent.local_action import LocalAction, UnixSocketSink
from edgefleet.agent.model import load_model
from edgefleet.agent.sensors.vibration import VibrationSignal
from edgefleet.agent.sources import Block, Reading
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.testing import vibration_models

LOCAL_RATE_HZ = 1000.0
LOCAL_WINDOWS = 2000
EVENT_FRACTION = 0.05
CYCLE_S = 20.0
TRIGGER_STREAM_S = 400.0
TRIGGER = {"kind": "peak", "threshold": 1.0, "hold": 1}
TARGET_LOCAL_MS = 5.0

CONSUMER = """
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1]); s.settimeout(5)
n = int(sys.argv[2]); out = []
print("ready", flush=True)
while len(out) < n:
    try:
        data = s.recv(65536)
    except TimeoutError:
        break
    at = time.monotonic(); m = json.loads(data)
    out.append([m["seq"], at, m["latency_ms"]])
open(sys.argv[3], "w").write(json.dumps(out))
"""


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_local_action(data: bytes, key: SigningKey, readings: list[Reading], work: Path) -> dict[str, Any]:
    """p50/p99 from a window's last sample to a local consumer's receipt, against the model's own latency."""
    model = load_model(decide(data, TrustState(keys={key.public.key_id: key.public})))
    spec = model.window
    assert spec is not None
    windows = min(LOCAL_WINDOWS, (len(readings) - spec.window) // spec.hop + 1)
    path, out = work / "local.sock", work / "local.json"
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, str(path), str(windows), str(out)],
                                stdout=subprocess.PIPE, text=True)
    assert consumer.stdout is not None and consumer.stdout.readline().strip() == "ready"
    local = LocalAction("bench", [UnixSocketSink(path, "dgram")])
    local.start()
    pipeline = InferencePipeline(model, sink=local)
    handed: list[float] = []
    period = 1.0 / LOCAL_RATE_HZ
    next_at = time.monotonic()
    for reading in readings:
        if len(handed) >= windows:
            break
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_at += period
        at = time.monotonic()
        if pipeline.push_block(Block(reading.values[np.newaxis])):
            handed.append(at)
    consumer.wait(60)
    local.close()
    received = json.loads(out.read_text())
    delays = [(arrived - handed[seq]) * 1000.0 for seq, arrived, _ in received]
    model_ms = [latency for _, _, latency in received]
    beyond = [d - m for d, m in zip(delays, model_ms, strict=True)]
    p99, model_p99 = _quantile(delays, 0.99), _quantile(model_ms, 0.99)
    return {"windows": len(received), "rate_hz": LOCAL_RATE_HZ, "sink": "unix dgram socket",
            "p50_ms": statistics.median(delays), "p99_ms": p99, "max_ms": max(delays),
            "model_p50_ms": statistics.median(model_ms), "model_p99_ms": model_p99,
            "beyond_model_p99_ms": _quantile(beyond, 0.99), "target_ms": TARGET_LOCAL_MS + model_p99,
            "dropped": local.counts()["dropped"], "failed": local.counts()["failed"]}


def vibration_blocks(seconds: float, block: int = 64) -> tuple[list[Block], float]:
    """The vibration stream with a fault EVENT_FRACTION of the time (the last part of every CYCLE_S), in blocks
    of ``block`` samples (a sensor FIFO); and the fraction of samples in a fault."""
    rate = vibration_models.RATE_HZ
    healthy = VibrationSignal(rate, seed=1)
    faulty = VibrationSignal(rate, fault="outer_race", seed=2)
    per_cycle = int(CYCLE_S * rate)
    event = int(EVENT_FRACTION * per_cycle)
    parts, flags = [], []
    for _ in range(int(seconds / CYCLE_S)):
        parts += [healthy.block(per_cycle - event)[0], faulty.block(event)[0]]
        flags += [np.zeros(per_cycle - event, bool), np.ones(event, bool)]
    samples, fault = np.concatenate(parts), np.concatenate(flags)
    return [Block(samples[i : i + block]) for i in range(0, len(samples), block)], float(fault.mean())


def measure_trigger(key: SigningKey, rounds: int = 3) -> dict[str, Any]:
    """Thread CPU time of the pipeline over the same vibration stream, with and without the trigger."""
    blocks, event_fraction = vibration_blocks(TRIGGER_STREAM_S)
    cnn = vibration_models.conv_model()
    trust = TrustState(keys={key.public.key_id: key.public})
    models = {name: load_model(decide(vibration_models.vibration_bundle(key, model=cnn, trigger=trigger), trust))
              for name, trigger in (("every window", None), ("trigger-gated", TRIGGER))}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    counts: dict[str, tuple[int, int]] = {}
    for _ in range(rounds):
        for name, model in models.items():
            pipeline = InferencePipeline(model)
            started = time.thread_time()
            for block in blocks:
                pipeline.push_block(block)
            cpu[name].append(time.thread_time() - started)
            counts[name] = (pipeline.stats.windows, pipeline.stats.trigger_skipped)
    every, gated = (statistics.median(cpu[name]) for name in models)
    inferred, skipped = counts["trigger-gated"]
    return {"stream_s": TRIGGER_STREAM_S, "event_fraction": event_fraction, "trigger": TRIGGER,
            "windows": counts["every window"][0], "windows_inferred_gated": inferred, "windows_skipped": skipped,
            "cpu_s_every_window": every, "cpu_s_gated": gated, "cpu_saved": 1.0 - gated / every,
            "cpu_ms_per_stream_s_every_window": every / TRIGGER_STREAM_S * 1000.0,
            "cpu_ms_per_stream_s_gated": gated / TRIGGER_STREAM_S * 1000.0}


def section(local: dict[str, Any], trigger: dict[str, Any]) -> str:
    return "\n\n".join([
        f"Local action (E11): local_action_p99_ms **{local['p99_ms']:.2f}** (p50 {local['p50_ms']:.2f}, max "
        f"{local['max_ms']:.2f}) from a window's last sample to a consumer in another process on a "
        f"{local['sink']}, {local['windows']} windows of the demo model streamed sample by sample at "
        f"{local['rate_hz']:.0f} Hz; the model's own p99 is {local['model_p99_ms']:.2f} ms, so the target is "
        f"{local['target_ms']:.2f} ms; beyond the model's run, p99 {local['beyond_model_p99_ms']:.2f} ms. "
        f"Dropped {local['dropped']}, failed {local['failed']}.",
        f"Trigger gating (E11): trigger_cpu_saved **{trigger['cpu_saved']:.0%}** on the vibration source with a "
        f"fault {trigger['event_fraction']:.0%} of the time ({trigger['stream_s']:.0f} s of stream, "
        f"{trigger['windows']} windows; the model ran on {trigger['windows_inferred_gated']}): "
        f"{trigger['cpu_ms_per_stream_s_every_window']:.2f} ms of CPU per second of stream on every window, "
        f"{trigger['cpu_ms_per_stream_s_gated']:.2f} ms gated (trigger {json.dumps(trigger['trigger'])}).",
    ])


if __name__ == "__main__":
    print(json.dumps(measure_trigger(SigningKey.generate(), rounds=1), indent=2))
