"""Sphinx configuration of dcbg's documentation

Build it with ``python -m sphinx -W -b html docs <folder>`` after
``pip install ".[docs]"``. The pages are written in reStructuredText beside
this file; the API reference and the command line are generated from the
code (autodoc with napoleon for the numpy-style docstrings, sphinx-argparse
for ``dcbg.cli.build_parser``), so they cannot drift from it.
"""
import pathlib
import sys

# Document the checkout these pages belong to, also where another dcbg is installed.
SOURCE = pathlib.Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SOURCE))

import dcbg  # noqa: E402 - needs the path above

project = "dcbg"
author = "dcbg developers"
copyright = "dcbg developers"
release = dcbg.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
]

# Every page is built from this folder alone: no inventories are fetched from
# the web (no intersphinx), so the build works offline and in CI.
exclude_patterns = ["_build"]

# The docstrings are numpy style ("Parameters" with dashes underneath).
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": True}

# Single backquotes in the docstrings name parameters and objects: shown as code.
default_role = "py:obj"

# Commands are copied from these pages into shells: "--dask" must stay two hyphens
# and quotes must stay straight, where smart quotes would print an en-dash and
# curly quotes (also in the command-line help and in docstrings, which are text).
smartquotes = False

html_theme = "furo"
html_title = f"dcbg {release}"

# napoleon reads the first line of an attribute's or constant's docstring as
# "type: description" and splits it at its first colon; dcbg writes those
# docstrings as plain sentences (the type is the annotation), so they are
# shown as written unless they carry numpy sections of their own.
ONE_LINE_DOCSTRINGS = ("attribute", "data", "property")
_as_written: dict[str, list[str]] = {}


def _keep_as_written(app, what, name, obj, options, lines):
    if what in ONE_LINE_DOCSTRINGS and not any(_is_underline(line) for line in lines):
        _as_written[name] = list(lines)


def _restore_as_written(app, what, name, obj, options, lines):
    if name in _as_written:
        lines[:] = _as_written.pop(name)


def _is_underline(line: str) -> bool:
    text = line.strip()
    return len(text) > 2 and set(text) == {"-"}


def setup(app):
    # napoleon's own handler runs at the default priority (500), between these two
    app.connect("autodoc-process-docstring", _keep_as_written, priority=400)
    app.connect("autodoc-process-docstring", _restore_as_written, priority=600)
