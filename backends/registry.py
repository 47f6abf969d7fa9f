"""One registry of backends. Built-ins register on import; third parties through an entry point group.

A third-party package adds to its pyproject.toml:

    [project.entry-points."exactbench.backends"]
    myengine = "my_package.adapter:MyEngineBackend"
"""
from __future__ import annotations

from importlib.metadata import entry_points

from .base import Backend

ENTRY_POINT_GROUP = "exactbench.backends"

_BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend under `cls.name`; a second backend with the same name is refused (the same
    class imported again, e.g. after pytester's in-process runs dropped its module, replaces the first)."""
    existing = _BACKENDS.get(cls.name)
    reimported = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
    if existing is not None and existing is not cls and not reimported:
        raise ValueError(f"backend name {cls.name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    _BACKENDS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _BACKENDS.pop(name, None)


def load_entry_points() -> None:
    """Import every backend advertised in the entry point group (ours included) so it registers."""
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _BACKENDS:
            continue
        cls = entry_point.load()
        if getattr(cls, "name", None) != entry_point.name:
            raise ValueError(f"entry point {entry_point.name!r} loads {cls!r}, whose name is {getattr(cls, 'name', None)!r}")
        register(cls)


def available() -> list[str]:
    load_entry_points()
    return sorted(_BACKENDS)


def get_backend(name: str) -> type[Backend]:
    load_entry_points()
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}") from None
