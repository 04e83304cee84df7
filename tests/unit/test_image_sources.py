"""Image sources for real frames: a directory of image files (Pillow), a video file (OpenCV) and a live camera
(its in-memory twin). Frames come as RGB [h, w, c]; a file that is not an image, a frame of the wrong size or
channel count is skipped and counted while the agent keeps running; frames that come faster than inference are
dropped and counted, never queued; closing a live source stops its capture thread."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.agent.sensors.camera import LatestFrame, LiveFrameSource, RecordedFrameSource, SyntheticCamera, opencv
from edgefleet.agent.sensors.images import ImageDirectorySource
from edgefleet.agent.sources import Reading, open_source
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.errors import ConfigError
from edgefleet.testing.agents import model_ref
from edgefleet.testing.linear import linear_model
from edgefleet.transport.mqtt_url import MqttEndpoint

Image = pytest.importorskip("PIL.Image")
KEY = SigningKey.generate()
H, W = 8, 6


def image_model(channels: int = 3) -> bytes:
    """[N, channels, H, W] -> 3 class scores; its pipeline, inferred: an NCHW image of H x W, no resize."""
    return linear_model([channels, H, W], 3)


def write_png(path: Path, frame: np.ndarray) -> None:
    Image.fromarray(frame).save(path)


def frames(n: int, height: int = H, width: int = W, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(n)]


def test_a_directory_of_png_files_gives_rgb_frames_labelled_from_labels_csv(tmp_path: Path) -> None:
    written = frames(3)
    for i, frame in enumerate(written):
        write_png(tmp_path / f"f{i}.png", frame)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("file,label\nf0.png,cat\nf1.png,dog\nf2.png,cat\n")
    source = open_source(f"images:{tmp_path}?rate=inf")
    assert isinstance(source, ImageDirectorySource) and source.waits_for_model
    readings = list(source.readings())
    assert len(readings) == 3 and source.skipped == 1, "the text file is skipped and counted"
    for reading, frame in zip(readings, written, strict=True):
        np.testing.assert_array_equal(reading.values, frame)
    assert source.labels == ("cat", "dog")
    assert [source.labels[r.label] for r in readings if r.label is not None] == ["cat", "dog", "cat"]


def test_a_directory_gives_grey_frames_to_a_one_channel_model(tmp_path: Path) -> None:
    from edgefleet.runtime.inputs import input_step

    write_png(tmp_path / "a.png", frames(1)[0])
    source = open_source(f"images:{tmp_path}?rate=inf")
    source.bind(input_step({"kind": "image", "height": H, "width": W, "channels": 1}))
    (reading,) = list(source.readings())
    assert reading.values.shape == (H, W, 1) and reading.values.dtype == np.uint8


def test_a_late_reader_of_a_directory_drops_frames_unread(tmp_path: Path) -> None:
    for i, frame in enumerate(frames(10)):
        write_png(tmp_path / f"f{i:02d}.png", frame)
    now = [0.0]
    source = ImageDirectorySource(tmp_path, rate_hz=10.0, clock=lambda: now[0], sleep=lambda s: None)
    taken = 0
    for _ in source.readings():
        taken += 1
        now[0] += 0.25  # inference takes 2.5 frame periods
    assert source.dropped > 0 and taken + source.dropped == 10 and source.skipped == source.dropped


def agent_with(tmp_path: Path, model: bytes) -> Agent:
    bundle = pack_bundle(model, KEY, BundleSpec(name="clf", version="1.0.0", labels=["a", "b", "c"]))
    config = AgentConfig(device_id="d1", server_url="http://127.0.0.1:9", mqtt=MqttEndpoint("127.0.0.1", 9),
                         token="t", trusted_keys={KEY.public.key_id: KEY.public}, data_dir=tmp_path / "agent")
    fetcher = InMemoryFetcher()
    agent = Agent(config, fetcher=fetcher)
    target = model_ref(bundle, "1.0.0", 1)
    fetcher.artifacts[target.url] = bundle
    agent.updater.install(target)
    assert agent.model is not None and agent.model.ref == "clf@1.0.0"
    return agent


def telemetry(agent: Agent) -> dict[str, int]:
    """The counters of every telemetry batch the agent queued, summed."""
    totals = {"windows": 0, "skipped": 0}
    for item in agent.state.pending():
        if item.topic.endswith("/telemetry"):
            batch = json.loads(item.payload)
            for key in totals:
                totals[key] += int(batch.get(key, 0))
    return totals


def test_frames_of_the_wrong_size_are_skipped_and_counted_while_the_agent_keeps_running(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = frames(4)
    for i, frame in enumerate(good):
        write_png(images / f"{i}-good.png", frame)
    write_png(images / "1-large.png", frames(1, H + 2, W)[0])
    write_png(images / "2-small.png", frames(1, H, W - 1)[0])
    (images / "3-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    agent = agent_with(tmp_path, image_model())
    source = open_source(f"images:{images}?rate=inf")
    agent.run(source)
    totals = telemetry(agent)
    assert totals == {"windows": 4, "skipped": 3}, "two frames of the wrong size and a broken file"
    agent.state.close()


def test_frames_of_the_wrong_channel_count_are_skipped_and_counted(tmp_path: Path) -> None:
    rgb = np.stack(frames(5))  # a recordings file of RGB frames [n, h, w, 3], replayed to a one-channel model
    np.savez(tmp_path / "frames.npz", test_x=rgb, test_y=np.zeros(5, dtype=np.int64))
    agent = agent_with(tmp_path, image_model(channels=1))
    agent.run(open_source(f"npz:{tmp_path / 'frames.npz'}?speed=inf&loop=0"))
    assert telemetry(agent) == {"windows": 0, "skipped": 5}
    agent.state.close()


def test_a_video_written_by_opencv_is_read_back_as_rgb_frames(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build writes no MJPG video")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)] * 2  # RGB
    for rgb in colours:
        writer.write(np.full((24, 32, 3), rgb[::-1], dtype=np.uint8))  # OpenCV writes BGR
    writer.release()
    source = open_source(f"video:{path}?rate=inf")
    assert isinstance(source, RecordedFrameSource) and source.waits_for_model
    read = [r.values for r in source.readings()]
    assert len(read) == len(colours)
    for frame, rgb in zip(read, colours, strict=True):
        assert frame.shape == (24, 32, 3)
        assert int(np.argmax(frame.reshape(-1, 3).mean(axis=0))) == int(np.argmax(rgb)), "RGB, not BGR"
    looped = open_source(f"video:{path}?rate=inf&loop=1")
    assert isinstance(looped, RecordedFrameSource)
    assert sum(1 for _, _ in zip(range(15), looped.readings(), strict=False)) == 15
    looped.close()


def test_a_late_reader_of_a_video_skips_frames_without_decoding_them() -> None:
    now = [0.0]
    camera = SyntheticCamera(4, 4, fps=None, frames=20)
    source = RecordedFrameSource(camera, 10.0, clock=lambda: now[0], sleep=lambda s: None)
    taken = []
    for reading in source.readings():
        taken.append(int(reading.values[0, 0, 0]))
        now[0] += 0.3
    assert taken[0] == 1 and taken == sorted(taken)
    assert len(taken) + source.dropped == 20 and source.skipped == source.dropped > 0
    assert camera.closed


def test_the_one_slot_buffer_keeps_the_newest_frame_and_counts_the_rest() -> None:
    slot = LatestFrame()
    for i in range(3):
        slot.put(np.full(1, i))
    taken = slot.take(0.0)
    assert taken is not None and taken[0] == 2 and slot.overwritten == 2
    assert slot.take(0.0) is None


def test_a_live_camera_faster_than_inference_drops_frames_and_never_queues() -> None:
    camera = SyntheticCamera(16, 12, fps=1000.0)
    source = LiveFrameSource(camera)
    seen: list[int] = []
    deadline = time.monotonic() + 10.0
    readings = cast(Generator[Reading, None, None], source.readings())
    for reading in readings:
        seen.append(int(reading.values[0, 0, 0]))
        time.sleep(0.02)  # inference at 50 frames per second, the camera at up to 1000
        if len(seen) == 10 or time.monotonic() > deadline:
            break
    assert len(seen) == 10 and source.capturing
    readings.close()
    wait = time.monotonic() + 5.0
    while source.capturing and time.monotonic() < wait:
        time.sleep(0.01)
    assert not source.capturing and camera.closed
    assert source.dropped > 0 and 0 < source.skipped <= source.dropped
    # every frame captured was taken or counted as dropped, but for the one left in the slot: nothing queued
    assert camera.index - 1 <= len(seen) + source.dropped <= camera.index


def test_close_stops_the_capture_thread_as_sigterm_does() -> None:
    camera = SyntheticCamera(8, 8, fps=200.0)
    source = LiveFrameSource(camera)
    got: list[int] = []

    def consume() -> None:
        for _ in source.readings():
            got.append(1)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 10.0
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close()  # what the agent's SIGTERM handler calls
    reader.join(timeout=5.0)
    assert not reader.is_alive() and len(got) >= 3
    assert not source.capturing and camera.closed


def test_a_finite_synthetic_camera_ends_its_stream() -> None:
    source = open_source("camera:synthetic?width=5&height=4&fps=1000&frames=3")
    assert isinstance(source, LiveFrameSource) and not source.waits_for_model
    shapes = [r.values.shape for r in source.readings()]
    assert 1 <= len(shapes) <= 3 and set(shapes) == {(4, 5, 3)}
    assert not source.capturing


def test_bad_image_source_specs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for spec in (f"images:{tmp_path / 'missing'}", f"images:{tmp_path / 'empty'}", f"images:{tmp_path}?fps=3",
                 "video:/no/such/clip.mp4", "camera:/dev/video0", "camera:front", "camera:synthetic?width=0",
                 "camera:synthetic?colour=red", f"images:{tmp_path}?rate=-1", f"images:{tmp_path}?rate=0",
                 "camera:synthetic?width=inf", "camera:synthetic?frames=2.5"):
        with pytest.raises(ConfigError):
            open_source(spec)


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ConfigError, match=r"edgefleet\[camera\]"):
        opencv()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match=r"edgefleet\[camera\]"):
        open_source("images:.")
