"""dcbg as dcnum's "rollmed" background method, without changing dcnum's files

dcnum finds background methods by PPID code through
``dcnum.feat.feat_background.get_available_background_methods()``, a cached
function that walks ``Background.__subclasses__()`` in creation order, so a
later subclass with the same code wins. :func:`register` creates (once) a
subclass of dcnum's ``Background`` named ``BackgroundRollMed`` that hands
the work to :class:`dcbg.BackgroundRollMed`, and clears that cache. From
then on dcnum's job runner, its PPID checks and its command line use dcbg
(on a GPU when "auto" finds one) and write the same bytes and PPIDs.

Example
-------
>>> import dcbg
>>> adapter = dcbg.register_with_dcnum()  # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import time

from .errors import ExtraNotInstalled, install_advice

logger = logging.getLogger(__name__)

_adapter: type | None = None


def _make_adapter() -> type:
    from dcnum.feat.feat_background.base import Background as DcnumBackground

    from .rollmed import BackgroundRollMed as DcbgRollMed

    class BackgroundRollMed(DcnumBackground):
        """dcbg's rolling median behind dcnum's ``Background`` API

        Takes dcnum's constructor arguments; the device is chosen as for
        ``device="auto"`` (the ``DCBG_DEVICE`` environment variable
        overrides it). Attributes dcnum uses (``image_proc``, ``kwargs``,
        ``image_count``, ``image_shape``, ``output_path``) are dcbg's.
        """

        check_user_kwargs = staticmethod(DcbgRollMed.check_user_kwargs)

        def __init__(self, input_data, output_path, compress=True, num_cpus=None, **kwargs):
            # dcnum's __init__ is not called: it would open and create files
            # that dcbg opens and writes itself. The logger has dcnum's name,
            # so dcnum's job log (and ChipStream's) records what dcbg did.
            self.logger = logging.getLogger(
                f"dcnum.feat.feat_background.{type(self).__name__}")
            self.background = DcbgRollMed(input_data, output_path, compress=compress,
                                          num_cpus=num_cpus, **kwargs)
            """the dcbg instance doing the work"""
            for name in ("kwargs", "image_proc", "image_count", "image_shape",
                         "output_path", "num_cpus", "input_data", "h5in"):
                setattr(self, name, getattr(self.background, name))
            self.hdin = None
            self.h5out = None

        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            self.background.close()

        def process(self):
            """Compute and store image_bg with dcbg (see :meth:`dcbg.Background.process`)

            Logs dcnum's line on the computation time and dcbg's run log, so
            that the job's log shows the background ran through dcbg.
            """
            t0 = time.perf_counter()
            self.background.process()
            self.logger.info(f"Background computation time: {time.perf_counter() - t0:.1f}s")
            record = self.background.run_record
            self.logger.info(f"Computed by {record['software']} on {record['device']}, "
                             f"run log: {json.dumps(record)}")

        def process_approach(self):
            self.background.process_approach()

    BackgroundRollMed.__module__ = __name__
    BackgroundRollMed.__qualname__ = "BackgroundRollMed"
    return BackgroundRollMed


def register() -> type:
    """Make dcnum's "rollmed" background method use dcbg

    Safe to call any number of times: the adapter class is created once.

    Returns
    -------
    adapter: type
        The class dcnum now returns for "rollmed".

    Raises
    ------
    ImportError
        If dcnum is not installed (dcbg's ``dcnum`` extra brings it).
    """
    global _adapter
    try:
        from dcnum.feat.feat_background import base
    except ImportError as error:
        raise ExtraNotInstalled(f"dcnum is not installed; install it with "
                                f"{install_advice('dcnum')} to use dcbg inside dcnum.") from error
    if _adapter is None:
        _adapter = _make_adapter()
    base.get_available_background_methods.cache_clear()
    chosen = base.get_available_background_methods().get("rollmed")
    if chosen is not _adapter:
        raise RuntimeError(
            f"dcnum resolves 'rollmed' to {chosen!r} instead of dcbg's adapter; this dcnum "
            f"version picks background methods differently, so pin dcnum 0.31.")
    logger.info("dcnum's 'rollmed' background now runs on dcbg")
    return _adapter
