"""``conduit-otel-cache serve``: the exporter that publishes the cluster view.

The data path: :mod:`.exposition` turns each view into series and renderings,
:mod:`.render_process` renders them in a child process, :mod:`.http` serves them with the
routes of :mod:`.landing`, ``/health`` and the JSON API, :mod:`.webconfig` adds TLS and basic
auth, :mod:`.otlp` pushes the same series over OTLP/HTTP and :mod:`.service` runs it all.
An application that only records and flushes imports none of it.
"""
