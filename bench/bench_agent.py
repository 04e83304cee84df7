"""Agent benchmark: the inference loop's cost against bare ONNX Runtime, resident memory against a bare model
process, and uplink bytes against raw sensor bytes over the demo stream.

Models, both on the demo's input (BasicMotions, 6 channels at 10 Hz, windows of 40 samples every 5):
* ``resnet1d``: the fully convolutional ResNet baseline for time-series classification (Wang et al. 2017;
  three residual blocks of 64/128/128 filters, kernels 8/5/3; about 0.5 M parameters), float32, trained
  briefly here: a model of realistic size for a Raspberry-Pi-class device, so the ratio means something;
* ``demo``: the demo's own 1D-CNN (about 3.5 k parameters, int8), whose inference takes tens of microseconds,
  so the ratio mostly shows the fixed per-window cost of the Python loop.

Everything at the agent's own defaults (telemetry every ``AgentConfig.telemetry_interval_s``, 300 s).

loop: ``Agent.run`` (the real loop: source validation, windowing and scaling, inference, post-processing,
drift, hard-example sampling, statistics) over the demo stream from memory, handed over in blocks of one
recording (100 samples) as the npz replay hands them over at full speed, plus the real SQLite outbox enqueue
of one telemetry batch per telemetry interval of stream, against ``session.run`` on the same windows; rounds
alternate between the two and the medians are compared.
rss: the ``edgefleet agent`` process (offline, replaying the demo stream at full speed) against a Python
process that only loads the same model in ONNX Runtime and runs it; both sampled from /proc (VmHWM). Also
the dependency floor: the bare process plus paho-mqtt (its network thread running), an SQLite database and
zipfile, without any of the agent's code, and with OpenSSL kept out as the agent keeps it out on a plain
(non-TLS) configuration.
uplink: every byte the agent would publish (telemetry and event payloads, MQTT header and topic) over one
hour of the demo stream, against the raw sensor bytes (float32 per channel value), per telemetry interval.

Run: ``python -m bench.bench_agent`` (``make bench-agent``); ``--profile`` prints where the loop spends time.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, markdown_table, publish
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.inference import InferencePipeline
from edgefleet.agent.model import load_model
from edgefleet.agent.sources import NO_LABEL, Block, Reading, SensorSource
from edgefleet.agent.state import AgentState, Slot, device_public_key
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.runtime.preprocess import StreamWindower
from edgefleet.transport import topics
from edgefleet.transport.mqtt_url import MqttEndpoint
from edgefleet.transport.ports import free_port

DEFAULT_INTERVAL_S = float(AgentConfig.__dataclass_fields__["telemetry_interval_s"].default)
TELEMETRY_INTERVAL_S = DEFAULT_INTERVAL_S  # stream seconds per batch in the loop figure: the agent's default
LOOP_STREAM_LOOPS = 3  # the demo stream three times over (20 min): four chunks of one telemetry interval
UPLINK_INTERVALS_S = (2.0, 60.0, 300.0, 600.0, 900.0)
UPLINK_HEADLINE_S = DEFAULT_INTERVAL_S
UPLINK_HOURS = 1.0
PASSES = 5  # over the demo stream, chunk by chunk
START_TS = 1.8e9  # the uplink's stream clock (seconds since the epoch, as the agent stamps its batches)
DEVICE = "watch-01"
TARGETS = {"loop_ratio": 1.10, "rss_ratio": 1.25, "uplink_ratio": 0.01}


@dataclass(frozen=True)
class BenchModel:
    name: str
    model: bytes
    preprocess: dict[str, Any]
    labels: list[str]
    parameters: int
    accuracy: float | None


class MemorySource(SensorSource):
    """Readings already in memory, handed over in blocks of at most ``block_rows`` samples as the npz replay does
    at full speed (one recording at a time); the agent's own validation runs, no sensor is simulated."""

    def __init__(self, readings: list[Reading], labels: tuple[str, ...], block_rows: int = 100) -> None:
        super().__init__()
        self._readings = readings
        self.labels = labels
        self._blocks = [Block(np.stack([r.values for r in part]),
                              np.array([NO_LABEL if r.label is None else r.label for r in part], dtype=np.int64))
                        for part in (readings[i : i + block_rows] for i in range(0, len(readings), block_rows))]

    def _raw(self) -> Iterator[Reading | None]:
        yield from self._readings

    def _raw_blocks(self) -> Iterator[Block]:
        yield from self._blocks


def resnet1d(channels: int, classes: int) -> Any:
    """Wang et al. (2017) ResNet for time series: 3 blocks (64, 128, 128 filters; kernels 8, 5, 3), GAP, linear."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for i, k in enumerate((8, 5, 3)):
                layers += [nn.Conv1d(c_in if i == 0 else c_out, c_out, k, padding="same"), nn.BatchNorm1d(c_out)]
                if i < 2:
                    layers.append(nn.ReLU())
            self.body = nn.Sequential(*layers)
            self.skip = nn.Sequential(nn.Conv1d(c_in, c_out, 1), nn.BatchNorm1d(c_out))
            self.relu = nn.ReLU()

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.skip(x))

    return nn.Sequential(Block(channels, 64), Block(64, 128), Block(128, 128), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(128, classes))


def build_models(rec: Any) -> list[BenchModel]:
    from bench.windowed_cnn import build_basicmotions_model, normalize
    from edgefleet.build.evaluate import measure
    from edgefleet.build.train import export_classifier, train_classifier
    from edgefleet.data.windows import sliding_windows

    demo = build_basicmotions_model(rec)
    spec = demo.preprocess
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    train_x, train_y = sliding_windows(normalize(rec.train_x, mean, std), rec.train_y, spec["window"], 2)
    test_x, test_y = sliding_windows(normalize(rec.test_x, mean, std), rec.test_y, spec["window"], spec["hop"])
    net = train_classifier(lambda: resnet1d(spec["channels"], len(rec.labels)), train_x, train_y, len(rec.labels),
                           epochs=15)
    resnet = export_classifier(net, (spec["channels"], spec["window"]))
    params = sum(int(p.numel()) for p in net.parameters())
    return [BenchModel("resnet1d", resnet, spec, list(rec.labels), params, measure(resnet, test_x, test_y).accuracy),
            BenchModel("demo", demo.int8_model, spec, list(rec.labels), 3_500, demo.int8_metrics.accuracy)]


def bundle(model: BenchModel, key: SigningKey) -> bytes:
    return pack_bundle(model.model, key, BundleSpec(name=f"bench-{model.name}", version="1.0.0",
                                                    labels=model.labels, preprocess=model.preprocess))


def seed_agent(data_dir: Path, data: bytes, key: SigningKey) -> None:
    """Make ``data`` the active model of an agent state in ``data_dir``, as an installed update leaves it."""
    accepted = decide(data, TrustState(keys={key.public.key_id: key.public}))
    device_public_key(data_dir)  # its key pair, made at its first start (E7): the figures are a running device's
    state = AgentState(data_dir)
    state.save_bundle(accepted.sha256, data)
    state.stage(Slot(accepted.sha256, accepted.manifest.ref))
    state.activate_candidate(accepted.manifest.name, accepted.manifest.release)
    state.close()


def agent_config(data_dir: Path, key: SigningKey, interval_s: float) -> AgentConfig:
    return AgentConfig(device_id=DEVICE, server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", free_port()),
                       token="t", trusted_keys={key.public.key_id: key.public}, data_dir=data_dir,
                       telemetry_interval_s=interval_s)


def stream_readings(rec: Any, loops: int = 1) -> list[Reading]:
    """The demo stream (the test recordings one after another, as the npz replay sends them)."""
    rows = np.ascontiguousarray(rec.test_x.transpose(0, 2, 1), dtype=np.float32)
    return [Reading(row, int(label)) for _ in range(loops) for rec_rows, label in zip(rows, rec.test_y, strict=True)
            for row in rec_rows]


# loop -------------------------------------------------------------------------------------------------------
def measure_loop(model: BenchModel, data: bytes, key: SigningKey, readings: list[Reading], labels: tuple[str, ...],
                 work: Path, rate_hz: float) -> dict[str, Any]:
    """Chunks of one telemetry interval: ``Agent.run`` over the chunk (its last step enqueues the chunk's batch
    into the SQLite outbox) against ``session.run`` on the chunk's windows, alternating, chunk by chunk."""
    import onnxruntime as ort

    data_dir = work / f"loop-{model.name}"
    seed_agent(data_dir, data, key)
    agent = Agent(agent_config(data_dir, key, 3600.0))
    assert agent.model is not None
    spec = agent.model.window
    size = int(TELEMETRY_INTERVAL_S * rate_hz)
    chunks = [readings[i : i + size] for i in range(0, len(readings) - size + 1, size)]
    inputs = []
    for chunk in chunks:
        windower = StreamWindower(spec)
        inputs.append([w.x for r in chunk if (w := windower.push(r.values, r.label)) is not None])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    session = ort.InferenceSession(model.model, options, providers=["CPUExecutionProvider"])
    feed, output = session.get_inputs()[0].name, session.get_outputs()[0].name

    def bare(windows: list[np.ndarray]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        for x in windows:
            session.run([output], {feed: x})
        return time.perf_counter() - wall, time.thread_time() - cpu

    def loop(source: MemorySource) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        agent.run(source)
        return time.perf_counter() - wall, time.thread_time() - cpu

    sources = [MemorySource(chunk, labels) for chunk in chunks]  # the samples in memory, as a replay holds them
    bare(inputs[0])  # warm-up
    loop(sources[0])
    bare_s: list[tuple[float, float]] = []
    loop_s: list[tuple[float, float]] = []
    for n in range(PASSES * len(chunks)):
        source, windows = sources[n % len(chunks)], inputs[n % len(chunks)]
        if n % 2:
            loop_s.append(loop(source))
            bare_s.append(bare(windows))
        else:
            bare_s.append(bare(windows))
            loop_s.append(loop(source))
    batches = len([i for i in agent.state.pending(limit=100_000) if i.topic.endswith("/telemetry")])
    agent.state.close()
    windows_total = sum(len(inputs[n % len(chunks)]) for n in range(len(bare_s)))
    result: dict[str, Any] = {"model": model.name, "parameters": model.parameters, "accuracy": model.accuracy,
                              "chunks": len(bare_s), "windows": windows_total, "batches_enqueued": batches}
    for index, clock in ((1, "cpu"), (0, "wall")):
        paired = sorted(a[index] / b[index] for a, b in zip(loop_s, bare_s, strict=True))
        bare_w = sum(b[index] for b in bare_s) / windows_total * 1000.0
        agent_w = sum(a[index] for a in loop_s) / windows_total * 1000.0
        result[clock] = {"bare_ms_per_window": bare_w, "agent_ms_per_window": agent_w,
                         "overhead_us_per_window": (agent_w - bare_w) * 1000.0,
                         "ratio": statistics.median(paired), "ratio_of_totals": agent_w / bare_w,
                         "ratio_p10_p90": [paired[len(paired) // 10], paired[(len(paired) * 9) // 10]]}
    result["ratio"] = result["cpu"]["ratio"]
    return result


def profile_loop(agent_data: bytes, key: SigningKey, readings: list[Reading], labels: tuple[str, ...],
                 work: Path) -> None:
    data_dir = work / "profile"
    seed_agent(data_dir, agent_data, key)
    agent = Agent(agent_config(data_dir, key, 3600.0))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        agent.run(MemorySource(readings, labels))
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    agent.state.close()


# rss --------------------------------------------------------------------------------------------------------
BARE_SCRIPT = """
import sys, time, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1; o.log_severity_level = 3
s = ort.InferenceSession(open(sys.argv[1], "rb").read(), o, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
x = np.zeros([1] + [d if isinstance(d, int) else 1 for d in i.shape[1:]], dtype=np.float32)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.run(None, {i.name: x})
"""


FLOOR_SCRIPT = BARE_SCRIPT.replace("import sys, time, numpy as np, onnxruntime as ort", """\
import sys; sys.modules.update(dict.fromkeys(("ssl", "_ssl", "_hashlib")))  # OpenSSL out, as in the agent
import time, numpy as np, onnxruntime as ort, sqlite3, zipfile, json, logging, threading
import paho.mqtt.client as mqtt
db = sqlite3.connect(sys.argv[3]); db.execute("CREATE TABLE IF NOT EXISTS t (x)"); db.commit()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2); c.connect_async("127.0.0.1", 9); c.loop_start()""")
"""The dependency floor: the bare process plus what the agent cannot run without (paho-mqtt with its network
thread, an SQLite database, zipfile for the npz replay), and none of the agent's own code; OpenSSL kept out of
it as the agent process keeps it out on a plain configuration (edgefleet.agent.lean)."""


def watch_rss(command: list[str], log: Path, timeout_s: float = 120.0) -> dict[str, float]:
    """Run ``command``; sample /proc/PID/status every 20 ms; peak VmHWM and median VmRSS in MiB."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    rss: list[int] = []
    hwm = 0
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            break
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" in fields:
            rss.append(int(fields["VmRSS"].split()[0]))
            hwm = max(hwm, int(fields["VmHWM"].split()[0]))
        time.sleep(0.02)
    if process.poll() is None:
        process.kill()
    process.wait(10)
    if process.returncode not in (0, None) and process.returncode >= 0:
        raise RuntimeError(f"{command[:4]} exited with {process.returncode}: {log.read_text()[-500:]}")
    return {"peak_mib": hwm / 1024.0, "median_mib": statistics.median(rss) / 1024.0 if rss else 0.0}


def measure_rss(model: BenchModel, data: bytes, key: SigningKey, npz: Path, work: Path) -> dict[str, Any]:
    model_file = work / f"{model.name}.onnx"
    model_file.write_bytes(model.model)
    data_dir = work / f"rss-{model.name}"
    seed_agent(data_dir, data, key)
    creds = work / f"creds-{model.name}.json"
    creds.write_text(json.dumps({"device_id": DEVICE, "server_url": "http://127.0.0.1:9",
                                 "mqtt_url": f"mqtt://127.0.0.1:{free_port()}", "token": "t",
                                 "trusted_keys": {"bench": key.public.to_text()}}))
    agent = watch_rss([sys.executable, "-m", "edgefleet", "agent", "--credentials", str(creds), "--data-dir",
                       str(data_dir), "--source", f"npz:{npz}?speed=inf&loop=1", "--duration", "6"],
                      work / f"agent-{model.name}.log")
    bare = watch_rss([sys.executable, "-c", BARE_SCRIPT, str(model_file), "6"], work / f"bare-{model.name}.log")
    floor = watch_rss([sys.executable, "-c", FLOOR_SCRIPT, str(model_file), "6", str(work / f"floor-{model.name}.db")],
                      work / f"floor-{model.name}.log")
    return {"model": model.name, "agent_peak_mib": agent["peak_mib"], "agent_median_mib": agent["median_mib"],
            "bare_peak_mib": bare["peak_mib"], "bare_median_mib": bare["median_mib"],
            "floor_peak_mib": floor["peak_mib"], "floor_ratio": floor["peak_mib"] / bare["peak_mib"],
            "ratio": agent["peak_mib"] / bare["peak_mib"]}


def rss_breakdown(model_file: Path) -> dict[str, float]:
    """Resident MiB after each step, each in a fresh process: where the agent's memory over bare ORT goes."""
    steps = {
        "python (OpenSSL kept out, as the agent process does)": "from edgefleet.agent import lean; "
                                                                "lean.keep_openssl_out()",
        "numpy + onnxruntime + session": "import numpy, onnxruntime as ort; s = ort.InferenceSession(m)",
        "+ paho-mqtt (http.client, email; no ssl)": "import paho.mqtt.client",
        "+ sqlite3, zipfile": "import sqlite3, zipfile",
        "+ edgefleet.agent (the agent process's modules)": "import edgefleet.agent.main, edgefleet.agent.agent, "
                                                          "edgefleet.agent.sources, edgefleet.data.basicmotions",
        "(TLS, an update's download or an upstream only) + ssl, hashlib (OpenSSL)": "lean.allow_openssl(); "
                                                                                  "import ssl, _hashlib",
        "(update only) + pydantic, cryptography": "import edgefleet.core.update, edgefleet.transport.schemas",
        "(update only) + onnx, httpx": "import onnx, onnx.checker, httpx",
        "(not in the agent process) + cli (typer, rich)": "import edgefleet.cli",
    }
    out: dict[str, float] = {}
    code = f"m = open({str(model_file)!r}, 'rb').read()\n"
    for name, line in steps.items():
        code += line + "\n"
        probe = code + "import re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
        out[name] = int(result.stdout.strip()) / 1024.0
    return out


# uplink -----------------------------------------------------------------------------------------------------
def mqtt_publish_bytes(topic: str, payload: bytes) -> int:
    """Bytes of an MQTT 3.1.1 QoS 1 PUBLISH: fixed header, topic, packet id, payload."""
    remaining = 2 + len(topic) + 2 + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3
    return 1 + length_bytes + remaining


def measure_uplink(model: BenchModel, data: bytes, key: SigningKey, rec: Any) -> dict[str, Any]:
    loaded = load_model(decide(data, TrustState(keys={key.public.key_id: key.public})))
    rate = float(rec.sample_rate_hz)
    loops = int(np.ceil(UPLINK_HOURS * 3600 * rate / (rec.test_x.shape[0] * rec.test_x.shape[2])))
    readings = stream_readings(rec, loops)[: int(UPLINK_HOURS * 3600 * rate)]
    raw = len(readings) * readings[0].values.size * 4
    rows = []
    for interval in UPLINK_INTERVALS_S:
        pipeline = InferencePipeline(loaded, tuple(rec.labels))
        per_batch = int(interval * rate)
        sent = telemetry = events = batches = hard = 0
        for i, reading in enumerate(readings, 1):
            pipeline.push(reading)
            stream_ts = START_TS + i / rate
            for alert in pipeline.take_alerts():
                message = json.dumps({"device": DEVICE, "kind": "alert", "detail": alert}).encode()
                events += 1
                sent += mqtt_publish_bytes(topics.events(DEVICE), message)
            if i % per_batch == 0 or i == len(readings):
                batch = pipeline.take_batch(DEVICE, batches, stream_ts, 0)  # stream time paces the hourly budget
                payload = batch.to_bytes()
                batches += 1
                hard += len(batch.hard_examples)
                telemetry += len(payload)
                sent += mqtt_publish_bytes(topics.telemetry(DEVICE), payload)
        rows.append({"interval_s": interval, "batches": batches, "events": events, "hard_examples": hard,
                     "payload_bytes": telemetry, "uplink_bytes": sent, "raw_bytes": raw, "ratio": sent / raw,
                     "bytes_per_batch": telemetry / batches})
    return {"model": model.name, "stream_hours": len(readings) / rate / 3600, "samples": len(readings),
            "channels": int(readings[0].values.size), "rate_hz": rate, "raw_bytes": raw, "intervals": rows}


def main() -> None:
    from edgefleet.data.basicmotions import load_basicmotions, save_npz

    rec = load_basicmotions()
    key = SigningKey.generate()
    print("training the benchmark models (the demo's 1D-CNN and a ResNet-1D) ...", flush=True)
    models = build_models(rec)
    labels = tuple(rec.labels)
    readings = stream_readings(rec)
    loop_readings = stream_readings(rec, LOOP_STREAM_LOOPS)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        work = Path(tmp)
        npz = work / "basicmotions.npz"
        save_npz(rec, npz)
        bundles = {m.name: bundle(m, key) for m in models}
        if "--profile" in sys.argv:
            for m in models:
                print(f"--- {m.name}")
                profile_loop(bundles[m.name], key, readings, labels, work)
            return
        loops = [measure_loop(m, bundles[m.name], key, loop_readings, labels, work, float(rec.sample_rate_hz))
                 for m in models]
        rss = [measure_rss(m, bundles[m.name], key, npz, work) for m in models]
        breakdown = rss_breakdown(work / "demo.onnx")
        uplink = measure_uplink(models[1], bundles["demo"], key, rec)
        local_action, trigger = measure_local_and_trigger(bundles["demo"], key, loop_readings, work)
        field = measure_field(models[1], rec, npz, work, rss[1]["bare_peak_mib"])
    headline = next(r for r in uplink["intervals"] if r["interval_s"] == UPLINK_HEADLINE_S)
    result = {"loop_ratio": loops[0]["ratio"], "rss_ratio": rss[1]["ratio"], "uplink_ratio": headline["ratio"],
              "targets": TARGETS, "loop": loops, "rss": rss, "rss_breakdown_mib": breakdown, "uplink": uplink,
              "notes": notes(loops[0]["ratio"], rss[1], headline["ratio"])}
    result.update(local_action_p99_ms=local_action["p99_ms"], trigger_cpu_saved=trigger["cpu_saved"],
                  local_action=local_action, trigger=trigger)
    result.update({k: v for k, v in field.items() if k != "section"})
    result["targets"] = {**TARGETS, "rss_ratio_after_updates": 1.25, "uplink_wire_ratio": 0.01,
                         "base_install_ratio": 1.3}
    result.update(base_install())
    publish("agent", result, section(result) + "\n\n" + local_section(local_action, trigger) + "\n\n"
            + field["section"])


def base_install() -> dict[str, Any]:
    """The base install's figures, measured by ``make bench-install`` (bench/results/install.json), carried into
    this benchmark's results as the issue names them."""
    path = RESULTS / "install.json"
    if not path.exists():
        return {}
    install = json.loads(path.read_text())
    return {"base_install_mb": install["base_install_mb"], "base_install_ratio": install["base_install_ratio"],
            "base_install": {"measured_by": "make bench-install", "date": install.get("date"),
                             "onnxruntime_numpy_mb": install.get("onnxruntime_numpy_mb")}}


def measure_field(demo: BenchModel, rec: Any, npz: Path, work: Path, bare_peak_mib: float) -> dict[str, Any]:
    """E11 memory after updates and uplink on the wire, with real server and agent processes (bench.bench_wire)."""
    from bench import bench_wire

    result = bench_wire.measure(demo.model, demo.preprocess, demo.labels, npz, work, float(rec.sample_rate_hz),
                                int(rec.test_x.shape[1]), bare_peak_mib)
    return {**result, "section": bench_wire.section(result)}


def measure_local_and_trigger(demo: bytes, key: SigningKey, readings: list[Reading],
                              work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """E11 local action latency and trigger-gating CPU (bench.bench_local_action)."""
    from bench.bench_local_action import measure_local_action, measure_trigger

    return measure_local_action(demo, key, readings, work), measure_trigger(key)


def local_section(local_action: dict[str, Any], trigger: dict[str, Any]) -> str:
    from bench.bench_local_action import section as local_action_section

    return local_action_section(local_action, trigger)


def notes(loop_ratio: float, rss: dict[str, Any], uplink_ratio: float) -> dict[str, str]:
    """What each headline figure is, and why it misses its target where it does."""
    out = {"loop_ratio": f"resnet1d (realistic size), thread CPU time, median of per-chunk ratios, one chunk per "
                         f"telemetry interval ({TELEMETRY_INTERVAL_S:.0f} s, the default); elapsed time in "
                         "loop[0].wall, the demo model in loop[1]",
           "rss_ratio": "the demo model (what the demo's agents run), agent at its defaults; resnet1d in rss[0]",
           "uplink_ratio": f"demo stream, demo model, telemetry every {UPLINK_HEADLINE_S:.0f} s (the default), "
                           "hard examples int8 under the default budget of 2 an hour"}
    if loop_ratio > TARGETS["loop_ratio"]:
        out["loop_ratio"] += f"; MISSED: {loop_ratio:.3f} > {TARGETS['loop_ratio']}"
    if rss["ratio"] > TARGETS["rss_ratio"]:
        out["rss_ratio"] += (
            f"; MISSED: {rss['ratio']:.2f} > {TARGETS['rss_ratio']}. The dependency floor (bare process + "
            f"paho-mqtt with its network thread + SQLite + zipfile, OpenSSL kept out, none of the agent's "
            f"code) is already {rss['floor_ratio']:.2f} ({rss['floor_peak_mib']:.1f} MiB). The agent's own "
            "modules, threads and buffers add "
            f"{rss['agent_peak_mib'] - rss['floor_peak_mib']:.1f} MiB over that floor, where the target leaves "
            f"{TARGETS['rss_ratio'] * rss['bare_peak_mib'] - rss['floor_peak_mib']:.1f} MiB")
    if uplink_ratio > TARGETS["uplink_ratio"]:
        out["uplink_ratio"] += f"; MISSED: {uplink_ratio:.2%} > {TARGETS['uplink_ratio']:.0%}"
    return out


def section(result: dict[str, Any]) -> str:
    loop_rows = [(r["model"], f"{r['parameters']:,}", clock, f"{r[clock]['bare_ms_per_window'] * 1000:.0f}",
                  f"{r[clock]['agent_ms_per_window'] * 1000:.0f}", f"{r[clock]['overhead_us_per_window']:.0f}",
                  f"{r[clock]['ratio']:.3f} ({r[clock]['ratio_p10_p90'][0]:.2f}-{r[clock]['ratio_p10_p90'][1]:.2f})")
                 for r in result["loop"] for clock in ("cpu", "wall")]
    rss_rows = [(r["model"], f"{r['bare_peak_mib']:.1f}", f"{r['floor_peak_mib']:.1f} ({r['floor_ratio']:.2f})",
                 f"{r['agent_peak_mib']:.1f}", f"{r['ratio']:.2f}") for r in result["rss"]]
    up = result["uplink"]
    up_rows = [(f"{r['interval_s']:.0f}", r["batches"], f"{r['bytes_per_batch']:.0f}", r["hard_examples"],
                f"{r['uplink_bytes']:,}", f"{r['ratio']:.2%}") for r in up["intervals"]]
    mem = ", ".join(f"{k} {v:.0f}" for k, v in result["rss_breakdown_mib"].items())
    return "\n\n".join([
        f"loop_ratio **{result['loop_ratio']:.3f}** (target <= 1.10, resnet1d, CPU time), rss_ratio "
        f"**{result['rss_ratio']:.2f}** (target <= 1.25, demo model), uplink_ratio **{result['uplink_ratio']:.2%}** "
        f"(target <= 1%, demo stream, telemetry every {UPLINK_HEADLINE_S:.0f} s), all at the agent's defaults.",
        *[f"Note ({name}): {text}." for name, text in result["notes"].items() if "MISSED" in text],
        f"Per-window cost: the demo stream cut into chunks of one telemetry interval ({TELEMETRY_INTERVAL_S:.0f} s "
        "of stream); `Agent.run` over a chunk (ending with the enqueue of its batch into the SQLite outbox) "
        f"against `session.run` on the chunk's windows, alternating, {PASSES} passes; the samples reach the agent "
        "in blocks of one recording (100 samples), as the npz replay hands them over at full speed. ratio: median "
        "of the "
        "per-chunk ratios (p10-p90). cpu: the thread's CPU time (other processes on this shared machine do not "
        "count; the outbox's fsync wait does not either); wall: elapsed time.",
        markdown_table(["model", "parameters", "clock", "bare us", "agent us", "overhead us", "ratio (p10-p90)"],
                       loop_rows),
        "Resident memory, peak (VmHWM) from /proc: the `edgefleet agent` process (it execs into the lean "
        "`python -m edgefleet.agent`) replaying the stream offline against a Python process that only runs the "
        "same model in ONNX Runtime; floor: that process plus paho-mqtt (network thread running), SQLite and "
        "zipfile, none of the agent's code.",
        markdown_table(["model", "bare MiB", "floor MiB (ratio)", "agent MiB", "ratio"], rss_rows),
        f"Where the agent's memory goes (MiB resident after each import, fresh processes): {mem}.",
        f"Uplink over {up['stream_hours']:.1f} h of the demo stream ({up['channels']} channels at "
        f"{up['rate_hz']:.0f} Hz, float32: {up['raw_bytes']:,} raw bytes), by telemetry interval:",
        markdown_table(["interval s", "batches", "bytes/batch", "hard examples", "uplink bytes", "ratio"], up_rows),
    ])


if __name__ == "__main__":
    main()
