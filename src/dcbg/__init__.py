"""dcbg: rolling-median background images for RT-DC recordings, on GPUs and CPUs

The public names below are imported on first use, so that ``python -m``
tools of the package (the metadata probe) start without loading h5py's
whole stack of dcbg.
"""
import importlib

from ._version import __version__

_PUBLIC = {
    "Background": "background",
    "get_available_background_methods": "background",
    "BackgroundRollMed": "rollmed",
    "rolling_median_reference": "reference",
    "rolling_median": "arrays",
    "rolling_median_background": "arrays",
}


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dcbg' has no attribute {name!r}")
    from . import rollmed  # noqa: F401 - defines the built-in methods
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)


def register_with_dcnum() -> type:
    """Make dcnum's "rollmed" background use dcbg (see :mod:`dcbg.dcnum_plugin`)"""
    from . import dcnum_plugin
    return dcnum_plugin.register()


__all__ = [
    "Background",
    "BackgroundRollMed",
    "get_available_background_methods",
    "register_with_dcnum",
    "rolling_median",
    "rolling_median_background",
    "rolling_median_reference",
    "__version__",
]
