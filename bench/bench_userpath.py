"""User-path benchmark: a user's own model from ``edgefleet build`` to its first on-device inference, per input
kind, and the agent's per-inference cost on a MobileNetV2-class image model.

time to first inference: the README's commands as real processes (edgefleet.testing.userpath): ``build MODEL
--data DATA`` (the accuracy-gated search, defaults), ``model push``, ``device add``, an agent already running
with ``--source npz:DATA`` and ``--telemetry-interval 1`` (the default is 300 s: the first inference would be
reported minutes late), ``rollout create --waves 100%``. The update steps are timed from the agent's own events
(downloading, verifying, health_checking, activating, activated) against the moment ``rollout create`` was
started; the first inference is when ``device telemetry`` first counts a window (polled). The
replay runs at 10x the data's rate (a series row is one window: 16 samples at 20 Hz = 80 ms at 10x).

per-inference cost: ``InferencePipeline.push_block`` (the agent's real loop body: the reading check, the image
step (uint8 HWC frame -> scale 1/255 -> mean/std -> NCHW float32), inference, scoring, statistics, hard-example
sampling) over frames in blocks of 8, against ``session.run`` on the same, already prepared, inputs; thread CPU
time, rounds alternate, the median of per-round ratios. The model is MobileNetV2 (width 0.5, 96x96x3, untrained:
the timing does not depend on the weights), float32 and its int8 build.

Run: ``python -m bench.bench_userpath`` (``make bench-userpath``).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import markdown_table, publish
from edgefleet.testing.userpath import USER_MODELS, UserPath

TARGETS = {"agent_per_inference_ratio": 1.10}
FRAMES = 64
BLOCK = 8
ROUNDS = 15
SPEED = 10.0


def time_to_first_inference(work: Path) -> list[dict[str, Any]]:
    path = UserPath(work)
    rows = []
    try:
        path.start_server()
        for kind in ("series", "image", "vector"):
            user = USER_MODELS[kind]()
            manifest = path.ship(user, speed=SPEED)
            ref = f"{manifest['name']}@{manifest['version']}"
            first = _first_window_ts(path, f"{kind}-01", ref)
            steps = path.update_breakdown(f"{kind}-01")
            report = json.loads((work / f"{kind}-report.json").read_text())
            rows.append({"kind": kind, "model_bytes": len(user.model), "chosen": report.get("chosen"),
                         "build_s": path.timings["build"], "push_s": path.timings["push"],
                         "rollout_create_s": path.timings["rollout_create"], **steps,
                         "first_inference_after_rollout_s": first - path.rollout_started,
                         "first_inference_total_s": path.timings["build"] + path.timings["push"]
                         + first - path.rollout_started})
    finally:
        path.close()
    return rows


def _first_window_ts(path: UserPath, device: str, ref: str, timeout_s: float = 120.0) -> float:
    """When the server first counted a window of ``ref`` for ``device`` (polled every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.telemetry(device)["models"].get(ref, {}).get("windows"):
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"no inference of {ref} reported by {device} within {timeout_s:.0f} s")


def per_inference_cost() -> list[dict[str, Any]]:
    import onnxruntime as ort

    from bench.models import mobilenet_v2
    from edgefleet.agent.inference import InferencePipeline
    from edgefleet.agent.model import ModelInfo, make_model
    from edgefleet.agent.sources import Block
    from edgefleet.build.quantize import quantize_int8
    from edgefleet.build.train import export_classifier

    float_model = export_classifier(mobilenet_v2(10), (3, 96, 96))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(FRAMES, 96, 96, 3), dtype=np.uint8)
    spec = {"kind": "image", "height": 96, "width": 96, "channels": 3, "layout": "NCHW", "scale": 1 / 255,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    models = {"float32": float_model}
    from edgefleet.runtime.inputs import input_step

    step = input_step(spec)
    prepared = step.apply(frames)
    models["int8"] = quantize_int8(float_model, prepared[:32])
    out = []
    for name, model in models.items():
        info = ModelInfo(name="mobilenetv2", version="1.0.0", release=1, labels=[str(i) for i in range(10)],
                         preprocess=spec)
        loaded = make_model(info, "0" * 64, model)
        pipeline = InferencePipeline(loaded)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        feed, output = session.get_inputs()[0].name, session.get_outputs()[0].name
        inputs = [prepared[i : i + 1] for i in range(FRAMES)]
        blocks = [Block(frames[i : i + BLOCK]) for i in range(0, FRAMES, BLOCK)]

        def bare() -> float:
            cpu = time.thread_time()
            for x in inputs:  # noqa: B023 - timed in this iteration
                session.run([output], {feed: x})  # noqa: B023
            return time.thread_time() - cpu

        def agent() -> float:
            cpu = time.thread_time()
            for block in blocks:  # noqa: B023
                pipeline.push_block(block)  # noqa: B023
            return time.thread_time() - cpu

        bare(), agent()  # warm-up
        ratios, bare_s, agent_s = [], [], []
        for n in range(ROUNDS):
            first, second = (bare, agent) if n % 2 else (agent, bare)
            a = first()
            b = second()
            b_time, a_time = (a, b) if first is bare else (b, a)
            bare_s.append(b_time)
            agent_s.append(a_time)
            ratios.append(a_time / b_time)
        ratios.sort()
        out.append({"model": f"MobileNetV2-0.5 96x96 {name}", "frames_per_round": FRAMES, "rounds": ROUNDS,
                    "bare_ms": statistics.median(bare_s) / FRAMES * 1000,
                    "agent_ms": statistics.median(agent_s) / FRAMES * 1000,
                    "ratio": statistics.median(ratios), "ratio_p10_p90": [ratios[len(ratios) // 10],
                                                                           ratios[(len(ratios) * 9) // 10]]})
    return out


def main() -> None:
    print("per-inference cost on MobileNetV2-0.5 96x96 ...", flush=True)
    cost = per_inference_cost()
    print("time to first inference per input kind (real server, broker and agents) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-userpath-") as tmp:
        ttfi = time_to_first_inference(Path(tmp))
    headline = next(r for r in cost if r["model"].endswith("float32"))
    result = {"agent_per_inference_ratio": headline["ratio"], "targets": TARGETS, "per_inference": cost,
              "time_to_first_inference": ttfi,
              "time_to_first_inference_s": {r["kind"]: r["first_inference_total_s"] for r in ttfi}}
    publish("userpath", result, section(result))


def section(result: dict[str, Any]) -> str:
    cost_rows = [(r["model"], f"{r['bare_ms']:.3f}", f"{r['agent_ms']:.3f}",
                  f"{r['ratio']:.3f} ({r['ratio_p10_p90'][0]:.2f}-{r['ratio_p10_p90'][1]:.2f})")
                 for r in result["per_inference"]]

    def s(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        return "-" if value is None else f"{value:.2f}"

    ttfi_rows = [(r["kind"], r.get("chosen") or "-", s(r, "build_s"), s(r, "push_s"), s(r, "rollout_create_s"),
                  s(r, "to_downloading_s"), s(r, "download_s"), s(r, "health_check_s"), s(r, "to_activated_s"),
                  s(r, "first_inference_after_rollout_s"), s(r, "first_inference_total_s"))
                 for r in result["time_to_first_inference"]]
    verdict = "met" if result["agent_per_inference_ratio"] <= TARGETS["agent_per_inference_ratio"] else "MISSED"
    return "\n\n".join([
        f"agent_per_inference_ratio **{result['agent_per_inference_ratio']:.3f}** (target <= 1.10: {verdict}; "
        "MobileNetV2-0.5 96x96 float32, thread CPU time, median of per-round ratios).",
        "Per inference: the agent's loop body on uint8 camera frames (image step, inference, scoring, statistics) "
        "against `session.run` on the same inputs already prepared.",
        markdown_table(("model", "bare ms", "agent ms", "ratio (p10-p90)"), cost_rows),
        "Time to first inference: the README's commands as real processes on this machine; seconds. `to_*` are "
        "from the start of `rollout create` to the agent's event; the total is build + push + rollout to the "
        f"first telemetry batch with a window (agent at --telemetry-interval 1, replay at {SPEED:g}x).",
        markdown_table(("kind", "chosen", "build", "push", "rollout create", "to downloading", "download",
                        "health check", "to activated", "to first inference", "total"), ttfi_rows),
    ])


if __name__ == "__main__":
    main()
