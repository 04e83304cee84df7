"""`edgefleet fl serve`'s settings: bad values are one-line ConfigErrors before any Flower process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.errors import ConfigError
from edgefleet.learn.fl import ServeSettings


@pytest.mark.parametrize(("change", "message"), [
    ({"server_momentum": 1.0}, "--server-momentum must be in [0, 1)"),
    ({"server_momentum": -0.1}, "--server-momentum must be in [0, 1)"),
    ({"strategy": "fedsgd"}, "--strategy must be one of"),
    ({"address": "8088"}, "--address must be HOST:PORT"),
    ({"rounds": 0}, "rounds and min clients must be >= 1"),
])
def test_bad_settings_are_refused_with_one_line(tmp_path: Path, change: dict[str, object], message: str) -> None:
    settings = ServeSettings(**{"state_dir": tmp_path, "features": 64, "classes": 10, **change})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        settings.check()

