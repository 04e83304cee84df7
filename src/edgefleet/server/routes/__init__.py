"""The REST API's routers, one module per resource: ``system`` (health, metrics), ``models``, ``devices``
(and deployments), ``artifacts``. Each takes the :class:`~edgefleet.server.context.ServerContext` and the
operator dependency; ``server.app`` includes them all in one list."""
