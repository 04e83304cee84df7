"""``python -m edgefleet.agent``: the agent process (see :mod:`edgefleet.agent.main`)."""

import sys

from edgefleet.agent import lean

lean.keep_openssl_out()  # first, before anything imports hashlib or paho-mqtt (see edgefleet.agent.lean)

from edgefleet.agent.main import main  # noqa: E402

sys.exit(main())
