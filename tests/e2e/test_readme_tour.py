"""The README's tour, command by command, as a user types it into one shell, with a user's own time-series model
(tests/e2e/test_userpath.py takes every input kind through the same commands): README and CLI cannot drift
apart.

The commands are read from the fenced block after ``<!-- tour -->`` in README.md and sent, in order, to one
``bash`` process (so ``export`` and ``$ROLLOUT`` carry over). Only the ports change: 8080 and 8500 become free
loopback ports. Where a user would wait (a server starting, telemetry arriving, a gated rollout deciding), the
test waits and repeats the same command, never a different one. Every command must exit 0.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.testing.userpath import USER_MODELS, UserModel
from edgefleet.transport.ports import free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def tour_commands(text: str) -> list[str]:
    """The tour block's commands: continuation lines joined, comments and blank lines left out."""
    block = text.split("<!-- tour -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        code = line.split("  #", 1)[0]  # a trailing comment starts after two spaces
        if not code.strip() or code.lstrip().startswith("#"):
            continue
        current += code.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(" ".join(current.split()))
        current = ""
    return commands


class Shell:
    """One interactive bash; ``run`` sends a command and returns its exit code and output."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.process = subprocess.Popen(["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                        start_new_session=True)
        self.background = 0
        self._pending = b""
        """Output read from the pipe but not yet returned (read with os.read: a buffered readline can hold the
        rest of a command's output, its end marker included, where select never sees it)."""

    def run(self, command: str, timeout_s: float = 300.0) -> tuple[int, str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if command.endswith("&"):  # a long-running command: its output to a log, not to our pipe
            self.background += 1
            command = f"{command[:-1].rstrip()} > bg-{self.background}.log 2>&1 &"
        marker = f"__done_{uuid.uuid4().hex}".encode()
        self.process.stdin.write(f"{command}\necho {marker.decode()} $?\n".encode())
        self.process.stdin.flush()
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            at = self._pending.find(marker)
            if at >= 0 and b"\n" in self._pending[at:]:
                output, rest = self._pending[:at], self._pending[at:]
                line, _, self._pending = rest.partition(b"\n")
                return int(line.split()[1]), output.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([fd], [], [], min(1.0, left))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # the shell ended
                self._pending += chunk
        shown = self._pending.decode(errors="replace")[-500:]
        raise TimeoutError(f"{command!r} did not finish within {timeout_s:.0f} s: {shown}")

    def close(self) -> None:
        try:  # the tour's background processes (server, agent, serve-model) are this shell's children
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)


def second_version(user: UserModel) -> bytes:
    """The same model with its final weights nudged: a fine-tune, for the tour's next version."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(user.model)
    for index, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array * np.float32(1.01), tensor.name))
    serialized: bytes = model.SerializeToString()
    return serialized


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[tuple[Shell, str, int]]:
    kind = "series"
    user = USER_MODELS[kind]()
    (tmp_path / "model.onnx").write_bytes(user.model)
    (tmp_path / "model-v2.onnx").write_bytes(second_version(user) if kind != "vector" else user.model)
    np.savez(tmp_path / "data.npz", **user.data)  # type: ignore[arg-type]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    shell = Shell(tmp_path, env)
    try:
        yield shell, kind, len(user.data["test_x"])
    finally:
        shell.close()


@pytest.mark.timeout(600)  # ~50 s alone; some 40 commands in a row, each slower on a loaded CI machine
def test_the_readme_tour_runs_command_by_command(tour: tuple[Shell, str, int]) -> None:
    shell, kind, rows = tour
    api_port, upstream_port = free_port(), free_port()
    commands = tour_commands(README.read_text())
    assert len(commands) >= 20, commands
    seen: dict[str, str] = {}
    for command in commands:
        typed = command.replace("127.0.0.1:8080", f"127.0.0.1:{api_port}").replace("--port 8500",
                                                                                     f"--port {upstream_port}")
        if typed.startswith("edgefleet server "):
            typed = typed.replace("edgefleet server ", f"edgefleet server --port {api_port} ", 1)
        code, output = shell.run(typed)
        if command.startswith("edgefleet server "):
            wait_for(lambda: (shell.cwd / "srv" / "server.json").exists(), 60, "the server to start")
        elif command.startswith("edgefleet device telemetry"):
            ref = "model@1.1.0" if "model-v2.bundle" in seen else "model@1.0.0"
            code, output = repeat_until(shell, typed, lambda out, ref=ref: _windows(out, ref) > 0, 90)
        elif command.startswith("edgefleet rollout status") and "model-v2.bundle" in seen:
            code, output = repeat_until(shell, typed, lambda out: json.loads(out)["phase"] in (
                "done", "aborted", "paused"), 240)
        assert code == 0, f"{kind}: {command!r} exited {code}: {output[-800:]}"
        seen[command.split()[-1]] = output
        if "model-v2.bundle" in command and command.startswith("edgefleet build"):
            seen["model-v2.bundle"] = output

    workdir = shell.cwd
    assert (workdir / "rebuilt.bundle").read_bytes() == (workdir / "model-v2.bundle").read_bytes()
    first = json.loads(seen_output(shell, "edgefleet device telemetry cam-01 --json"))
    assert first["device"] == "cam-01" and _windows(json.dumps(first), "model@1.0.0") >= min(rows, 1)
    assert (workdir / "packed.bundle").exists() and (workdir / "gunpoint.bundle").exists()


def seen_output(shell: Shell, command: str) -> str:
    code, output = shell.run(command)
    assert code == 0, output
    return output


def _windows(output: str, ref: str) -> int:
    try:
        return int(json.loads(output)["models"].get(ref, {}).get("windows", 0))
    except (ValueError, KeyError, TypeError):
        return 0


def repeat_until(shell: Shell, command: str, done: object, timeout_s: float) -> tuple[int, str]:
    """Run ``command`` again until ``done(output)`` (as a user re-runs a status command)."""
    assert callable(done)
    deadline = time.monotonic() + timeout_s
    code, output = shell.run(command)
    while time.monotonic() < deadline:
        if code == 0 and done(output):
            return code, output
        time.sleep(1.0)
        code, output = shell.run(command)
    raise AssertionError(f"{command!r} never showed what the tour expects: {output[-800:]}")


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
