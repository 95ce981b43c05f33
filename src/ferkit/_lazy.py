"""A package's modules imported on first use: `import ferkit` stays light."""

from __future__ import annotations


def submodules_on_first_use(package: str):
    """A module `__getattr__` that imports the package's other modules on first use (`ferkit.video.analyze_video(...)`
    after `import ferkit`), so that importing ferkit stays light."""
    import importlib
    import importlib.util

    def __getattr__(name: str):
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
