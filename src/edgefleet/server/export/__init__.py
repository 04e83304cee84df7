"""Export of the fleet's streams to Kafka: telemetry batches, device events, alerts, rollout decisions and hard
examples, each on its own topic, keyed so that a key's order holds within a partition.

:mod:`.settings` says how to reach the cluster (TLS, SASL), :mod:`.envelope` what a message looks like (versioned
JSON Schemas in ``schemas/``), :mod:`.exporter` moves rows from the store's outbox to the broker (at least once,
one replica at a time), :mod:`.api` shows its state to operators and the dashboard.
"""
