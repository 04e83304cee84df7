"""``python -m edgefleet.agent``: the agent process (see :mod:`edgefleet.agent.main`)."""

import sys

from edgefleet.agent.main import main

sys.exit(main())
