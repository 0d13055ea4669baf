"""The process's forkserver, preloading what each of its users asked for.

Python keeps one forkserver per process, and ``set_forkserver_preload`` replaces its list of
modules: the decode pool (``data.decode_workers``) and the multi-rank test harness
(``testing.multirank``) would drop each other's. ``forkserver_context`` adds to one list
instead. Modules asked for after the server started are not in it; a child then imports them
itself — correct, only slower.

Why a forkserver at all: ``fork`` of a process with threads (gloo, OpenMP, a pool's manager
thread) copies their held locks into the child, which can deadlock in its first malloc or
OpenMP call; the forkserver is a fresh interpreter that has only imported modules, so each
child is a cheap fork of a single-threaded process. ``spawn`` is the fallback where there is no
forkserver (not on Linux).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context

_PRELOAD: list[str] = []


def start_method() -> str:
    """The start method ``forkserver_context`` gives: "forkserver", or "spawn" where there is
    no forkserver."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def forkserver_context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """A ``forkserver`` context whose server imports ``preload`` (added to what earlier
    callers asked for) when it starts; a ``spawn`` context where there is no forkserver."""
    if start_method() == "spawn":
        return multiprocessing.get_context("spawn")
    _PRELOAD.extend(module for module in preload if module not in _PRELOAD)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOAD))  # ignored once the server runs
    return context
