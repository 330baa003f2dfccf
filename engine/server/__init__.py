"""`moshi serve`: one model behind Kyutai's websocket protocols.

``app.py`` is the web application around one ``Service`` (the seam each endpoint implements: its
websocket path, its slots, its metrics, its sessions), with what every endpoint shares: API keys,
``/healthz``, ``/api/build_info``, ``/api/modules_info``, ``/metrics``, a static folder, a log line
per connection, and draining on shutdown. ``metrics.py`` is the Prometheus set each service keeps.
"""
