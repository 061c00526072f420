"""Gantry's metrics exporter: what the canary and the dashboards query in Prometheus.

A long-running host process (``python -m gantry.metrics serve``, started by `gantry env
up` and before every canary) that Prometheus scrapes as job ``gantry-exporter``. It
derives everything from sources the model servers cannot touch (they are untrusted: the
candidate is what is being tested):

* every router's access log (followed through the Docker API) becomes
  ``gantry_router_requests_total`` and the ``gantry_router_request_duration_seconds``
  histogram, per deployment, slot, version and probe kind;
* the Docker stats API gives ``gantry_container_cpu_seconds_total``,
  ``gantry_container_memory_working_set_bytes`` and their limits, and restarts;
* the canary's quality probe scores (sent by Gantry with the exporter's token) become
  ``gantry_canary_quality_score`` per analysis window.

It also writes the file-service-discovery targets Prometheus scrapes per deployment
(``<state dir>/prometheus/targets/<deployment>.json``): the router's built-in HAProxy
exporter and each model server's own ``/metrics`` (job ``gantry-deployments``, labelled
``model``, ``deployment``, ``slot``, ``version``, ``release_id``). What a model server
reports about itself feeds dashboards and the chat TTFT check only; every other canary
check reads series of job ``gantry-exporter``, which no model server can write.
"""
