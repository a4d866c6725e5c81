"""An aiocache plugin recording cache statistics (``pip install 'conduit-otel-cache[aiocache]'``).

>>> cache = SimpleMemoryCache(plugins=[RecordingPlugin(stats, "Sessions")])

or, in ``caches.set_config``, ``"plugins": [{"class":
"conduit_otel_cache.integrations.aiocache.RecordingPlugin", "stats": "myapp.stats.cache_stats"}]``
(there ``stats`` is the handle's dotted path, as aiocache deep-copies its configuration).

Counted from aiocache's ``post_*`` hooks, with the times aiocache measures: ``get`` a
**hit**, or a **miss** when it returned ``None`` or the ``default`` given; ``multi_get`` a
hit or miss per key, each with an equal share of the call's time; ``set`` and ``add`` a
**set** when they stored (``add`` of a present key raises and counts nothing);
``multi_set`` a set per pair; ``increment`` a set. ``exists``, ``delete``, ``expire`` and
``clear`` count nothing, and aiocache does not report expiries. The region is ``region``,
by default the cache's ``namespace`` (trailing ``_ : . -`` removed) or else its backend name
(``memory``, ``redis``). Recording is in memory and synchronous inside the hook: it never
awaits, never does I/O and so never blocks the event loop.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from .recording import Recording, RegionRecorder, missing_extra, resolve_region, resolve_stats

try:
    from aiocache.plugins import BasePlugin
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra(__name__, "aiocache>=0.12", "aiocache") from exc

__all__ = ["RecordingPlugin"]


class RecordingPlugin(BasePlugin):  # type: ignore[misc]  # aiocache is untyped
    """Records the statistics of every cache it is a plugin of (see the module)."""

    def __init__(self, stats: Recording | str, region: str | None = None) -> None:
        self._stats = resolve_stats(stats, "RecordingPlugin stats")
        self._fixed = (
            None
            if region is None
            else RegionRecorder(self._stats, resolve_region(region, "RecordingPlugin region"))
        )
        self._per_cache: weakref.WeakKeyDictionary[Any, RegionRecorder] = (
            weakref.WeakKeyDictionary()
        )

    def _recorder(self, client: Any) -> RegionRecorder:
        if self._fixed is not None:
            return self._fixed
        try:
            return self._per_cache[client]
        except (KeyError, TypeError):  # TypeError: a cache that takes no weak reference
            pass
        name = str(getattr(client, "namespace", None) or "").rstrip("_:.-")
        recorder = RegionRecorder(self._stats, name or str(getattr(client, "NAME", "")))
        with contextlib.suppress(TypeError):
            self._per_cache[client] = recorder
        return recorder

    async def post_get(
        self, client: Any, key: Any, *args: Any, took: float = 0.0, ret: Any = None, **kw: Any
    ) -> None:
        default = kw["default"] if "default" in kw else (args[0] if args else None)
        if ret is None or (default is not None and ret is default):
            self._recorder(client).miss(took)
        else:
            self._recorder(client).hit(took)

    async def post_multi_get(
        self, client: Any, keys: Any, *args: Any, took: float = 0.0, ret: Any = None, **kw: Any
    ) -> None:
        values = list(ret or ())
        self._recorder(client).lookups(sum(v is not None for v in values), len(values), took)

    async def post_set(self, client: Any, *args: Any, ret: Any = None, **kw: Any) -> None:
        if ret:
            self._recorder(client).sets()

    async def post_add(self, client: Any, *args: Any, ret: Any = None, **kw: Any) -> None:
        if ret:
            self._recorder(client).sets()

    async def post_multi_set(
        self, client: Any, pairs: Any, *args: Any, ret: Any = None, **kw: Any
    ) -> None:
        if ret and hasattr(pairs, "__len__"):  # an iterator of pairs is spent: not counted
            self._recorder(client).sets(len(pairs))

    async def post_increment(self, client: Any, *args: Any, **kw: Any) -> None:
        self._recorder(client).sets()
