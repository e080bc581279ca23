"""The documentation site (docs/) builds with warnings as errors, and covers the public API

A docstring that does not render, a page that names a missing document, or
a public name left out of the API reference fails here, in the suite, as it
would fail CI's docs build. Skipped where the ``docs`` extra is not installed.
"""
import argparse
import html
import pathlib
import re
import subprocess
import sys

import pytest

import dcbg
from dcbg.cli import build_parser
from dcbg.cli.compute import COMPUTE_EXAMPLES, default_keywords

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


BLOCK_END = re.compile(r"</(?:p|dt|dd|li|div|pre|h[1-6]|td|th|tr)>|<br\s*/?>")
"""Tags that end a block: a reader sees a break there, where inline tags show nothing"""


def page_text(page: pathlib.Path) -> str:
    """What a reader sees of an HTML page: its text, without tags, blocks apart"""
    return html.unescape(re.sub(r"<[^>]+>", "", BLOCK_END.sub(" ", page.read_text())))


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


DOUBLE_DASH = re.compile(r"(?<![-\w])--(?:[A-Za-z][\w-]*)?(?![-\w])")
"""``--device``, ``--dry-run`` or a bare ``--``, not a title underline or a longer dash run"""

RST_MARKUP = re.compile(r"``|\*\*|:[a-z:]+:`|`_?")
"""Inline markup that reStructuredText shows as nothing: literals, strong, roles, links"""


def parser_texts(parser: argparse.ArgumentParser) -> list[str]:
    """Every text of `parser` and its subcommands that the command-line page renders"""
    texts = [parser.description or "", parser.epilog or "", parser.format_usage()]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue  # the page leaves out -h, which every subcommand has
        texts += [action.help or "", *action.option_strings]
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                texts += parser_texts(subcommand)
    return texts


def page_sources() -> dict[str, list[str]]:
    """The texts each HTML page is built from: its .rst file, and for cli the parser's texts"""
    sources = {path.stem: [path.read_text()] for path in (ROOT / "docs").glob("*.rst")}
    sources["cli"] += parser_texts(build_parser())
    return sources


def double_dash_phrases(text: str) -> list[str]:
    """Each ``--`` of `text` with the words on either side, as a reader sees them

    Title underlines are left out, inline markup is dropped and runs of
    whitespace count as one space, so the phrase reads as on the built page.
    """
    lines = [line for line in text.splitlines() if not re.fullmatch(r"\s*([-=~^])\1+\s*", line)]
    words = RST_MARKUP.sub("", " ".join(lines)).split()
    return [" ".join(words[max(0, at - 1):at + 2]) for at, word in enumerate(words)
            if DOUBLE_DASH.search(word)]


def test_pages_show_double_dashes_as_written(docs_build):
    """Commands copied from the site work: no ``--`` became an en-dash, no option changed"""
    folder = built(docs_build)
    sources = page_sources()
    assert any("--dask" in text for text in sources["cli"])  # the parser's texts were found
    for page, texts in sources.items():
        shown = " ".join(page_text(folder / f"{page}.html").split())
        for text in texts:
            for option in DOUBLE_DASH.findall(text):
                assert option in shown, f"{page}.html does not show {option!r}"
            for phrase in double_dash_phrases(text):
                assert phrase in shown, f"{page}.html does not show {phrase!r} as written"


def test_no_en_dash_starts_a_word(docs_build):
    """An en-dash glued to a word (``–dask``) is a ``--`` that the build turned into a dash"""
    for page in sorted(built(docs_build).glob("*.html")):
        text = page_text(page)
        glued = re.findall(r"\S{0,20}(?<![\w.])\u2013[A-Za-z]\S{0,20}", text)
        assert not glued, f"{page.name} shows en-dashes where the source has '--': {glued}"


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
