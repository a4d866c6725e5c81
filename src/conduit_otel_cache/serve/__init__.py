"""``conduit-otel-cache serve``: the exporter that publishes the cluster view.

The data path: :mod:`.series` turns a view into series (a pure function),
:mod:`.rendering` keeps their bytes per format warm (:mod:`.render_process` renders them in
a child process), :mod:`.scrape` answers ``/metrics`` from them and :mod:`.exposition`
composes the three with this process's own series; :mod:`.otlp` pushes the same series.
:mod:`.http` serves the routes (with :mod:`.landing` and the JSON API), :mod:`.webconfig`
adds TLS and basic auth, and :mod:`.service` runs it all. An application that only records
and flushes imports none of it.
"""
