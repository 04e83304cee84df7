"""Digital twins of devices: the real agent code on virtual sensors, networks and disks (``edgefleet twin``),
and rollout rehearsals on twins of the devices a rollout selects (``edgefleet rollout create --rehearse N``)."""
