"""``python -m edgefleet``."""

from edgefleet.entry import main

main()
