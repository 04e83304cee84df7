"""edgefleet: take a trained model to a fleet of edge devices and keep it healthy there."""

__version__ = "0.1.0"
