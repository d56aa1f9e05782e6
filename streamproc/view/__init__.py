"""``streamproc view``: a live web view of the streams and their predictions.

``state`` holds what the page shows (bounded, pure: no Kafka, no asyncio), ``frames``
turns the newest frame of each stream into a small JPEG off the event loop, ``health``
reads the workers' Prometheus endpoints, and ``server`` is the aiohttp application with
its own group-less Kafka reader. The page itself (``static/``) is plain HTML, JS and CSS
shipped in the package: no build step, nothing fetched from elsewhere.
"""
