"""dcbg: rolling-median background images for RT-DC recordings, on GPUs and CPUs"""
from ._version import __version__
from .base import Background, get_available_background_methods
from .reference import rolling_median_reference
from .rollmed import BackgroundRollMed


def register_with_dcnum() -> type:
    """Make dcnum's "rollmed" background use dcbg (see :mod:`dcbg.dcnum_plugin`)"""
    from . import dcnum_plugin
    return dcnum_plugin.register()


__all__ = [
    "Background",
    "BackgroundRollMed",
    "get_available_background_methods",
    "register_with_dcnum",
    "rolling_median_reference",
    "__version__",
]
