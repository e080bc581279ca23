"""The documentation site (docs/) builds with warnings as errors, and covers the public API

A docstring that does not render, a page that names a missing document, or
a public name left out of the API reference fails here, in the suite, as it
would fail CI's docs build. Skipped where the ``docs`` extra is not installed.
"""
import html
import pathlib
import re
import subprocess
import sys

import pytest

import dcbg
from dcbg.cli import COMPUTE_EXAMPLES, build_parser, default_keywords

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docs_build(tmp_path_factory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    """The HTML pages, built as CI builds them (``-W``: every warning is an error)"""
    for module in ("sphinx", "sphinxarg", "furo"):
        pytest.importorskip(module, reason="the docs extra (pip install '.[docs]') is needed")
    folder = tmp_path_factory.mktemp("docs")
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(folder / "doctrees"), str(ROOT / "docs"), str(folder / "html")],
        capture_output=True, text=True, timeout=600)
    return run, folder / "html"


def built(docs_build) -> pathlib.Path:
    """The folder of the HTML pages, once the build is known to have passed"""
    run, folder = docs_build
    assert run.returncode == 0, f"the docs build failed:\n{run.stderr[-5000:]}"
    return folder


def page_text(page: pathlib.Path) -> str:
    """What a reader sees of an HTML page: its text, without tags"""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_docs_build_without_warnings(docs_build):
    folder = built(docs_build)
    for page in ("index", "api", "cli", "architecture", "files"):
        assert (folder / f"{page}.html").is_file(), page


def test_api_reference_documents_every_public_name(docs_build):
    api = (built(docs_build) / "api.html").read_text()
    public = [name for name in dcbg.__all__ if not name.startswith("_")]
    missing = [name for name in public if f'id="dcbg.{name}"' not in api]
    assert not missing, f"public names missing from docs/api.rst: {missing}"


def test_command_line_page_shows_every_subcommand(docs_build):
    subcommands = re.search(r"\{([^}]+)\}", build_parser().format_usage()).group(1).split(",")
    assert "compute" in subcommands
    text = page_text(built(docs_build) / "cli.html")
    missing = [name for name in subcommands if f"dcbg {name} [-h]" not in text]
    assert not missing, f"subcommands missing from the generated command line: {missing}"


def test_command_line_page_names_the_method_keywords_and_examples(docs_build):
    page = (built(docs_build) / "cli.html").read_text()
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    # the typography of dashes and quotes is not what this test is about
    text = text.replace("\u2013", "--").replace("\u201c", '"').replace("\u201d", '"')
    for code, cls in dcbg.get_available_background_methods().items():
        assert f"{code}: {default_keywords(cls)}" in text
    assert "rollmed: kernel_size=100, batch_size=10000" in text
    for command, meaning in COMPUTE_EXAMPLES:
        assert f"{command} {meaning}" in text
