"""Sensor sources beyond the file and replay ones in ``agent.sources``: a synthetic vibration generator and an
MQTT topic. ``agent.sources.open_source`` builds them from a spec string."""
