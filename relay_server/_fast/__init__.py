"""Hand-offs between the event loop and worker threads that neither block the loop nor allocate.

- ChunkQueue: bytes from the stream subscriber (event loop) to the demuxer (decode thread), read as
  a file-like object; the reader blocks without the GIL.
- copy_frame: copies a decoded frame into a pooled one without allocating.

Each comes in a compiled build (Cython in pure-Python mode: chunkqueue.py + .pxd, ...) and a plain
one (_chunkqueue_py.py, ...) with the same API, the reference the tests compare against. The
compiled build is used unless RELAY_NO_EXTENSIONS=1 or it is not built; IMPLEMENTATION says which.
"""

from __future__ import annotations

import logging
import os
from importlib import import_module
from importlib.machinery import ExtensionFileLoader
from importlib.util import find_spec
from types import SimpleNamespace
from typing import TYPE_CHECKING

from ._chunkqueue_py import QueueAborted

__all__ = ["IMPLEMENTATION", "ChunkQueue", "QueueAborted", "copy_frame", "implementations"]

log = logging.getLogger(__name__)

_MODULES = {
    "cython": ("chunkqueue", "planes"),
    "python": ("_chunkqueue_py", "_planes_py"),
}


def _load(name: str) -> SimpleNamespace:
    modules = []
    for module in _MODULES[name]:
        qualified = f"{__name__}.{module}"
        # The compiled build's .py is Cython source, not a fallback: import only a built extension.
        spec = find_spec(qualified)
        if name == "cython" and not isinstance(spec and spec.loader, ExtensionFileLoader):
            raise ImportError(f"{qualified} is not compiled (build it with `pip install -e .`)")
        modules.append(import_module(qualified))
    chunkqueue, planes = modules
    return SimpleNamespace(
        name=name,
        ChunkQueue=chunkqueue.ChunkQueue,
        QueueAborted=chunkqueue.QueueAborted,
        copy_frame=planes.copy_frame,
    )


_available = {"python": _load("python")}
if os.environ.get("RELAY_NO_EXTENSIONS", "") in ("", "0"):
    try:
        _available = {"cython": _load("cython"), **_available}
    except ImportError as exc:
        log.warning("using the plain-Python hand-offs, slower: %s", exc)

_active = next(iter(_available.values()))
IMPLEMENTATION: str = _active.name

if TYPE_CHECKING:
    # Both builds have this API; the compiled one's is in its .pyi stubs.
    from ._chunkqueue_py import ChunkQueue
    from ._planes_py import copy_frame
else:
    ChunkQueue = _active.ChunkQueue
    copy_frame = _active.copy_frame


def implementations() -> dict[str, SimpleNamespace]:
    """Every build that can be used here, by name ("cython", "python"), for tests and benchmarks.

    Each has the attributes name, ChunkQueue, QueueAborted and copy_frame.
    """
    return dict(_available)
