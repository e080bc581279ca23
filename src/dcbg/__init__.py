"""dcbg: rolling-median background images for RT-DC recordings, on GPUs and CPUs"""
from ._version import __version__
from .base import Background, get_available_background_methods
from .reference import rolling_median_reference
from .rollmed import BackgroundRollMed

__all__ = [
    "Background",
    "BackgroundRollMed",
    "get_available_background_methods",
    "rolling_median_reference",
    "__version__",
]
