"""``python -m edgefleet``."""

from edgefleet.cli import main

main()
