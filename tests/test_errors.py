"""The advice of dcbg's messages: every missing extra is named with a command that works

dcbg is installed from its checkout, not from a package index, so a message
or page that tells users to ``pip install "dcbg[dask]"`` sends them to a
command that fails.
"""
import pathlib
import pickle
import re
import sys

import pytest

from dcbg import cudaprobe
from dcbg.cli import main
from dcbg.dcnum_plugin import register
from dcbg.errors import (
    DeviceError,
    ExtraNotInstalled,
    SettingMessage,
    install_advice,
    setting_error,
)
from dcbg.synthetic import write_synthetic_rtdc

ROOT = pathlib.Path(__file__).resolve().parents[1]

USER_TEXTS = [ROOT / "README.md", *(ROOT / "docs").glob("*.rst"),
              *(ROOT / "src" / "dcbg").rglob("*.py"), *(ROOT / "docker").glob("Dockerfile*")]
"""What users read: the README, the documentation site, dcbg's messages, the Docker files"""


def test_install_advice_installs_from_the_checkout():
    assert install_advice("dask") == 'pip install ".[dask]" in the dcbg checkout'
    assert install_advice("cuda12", "cuda13") == \
        'pip install ".[cuda12]" or ".[cuda13]" in the dcbg checkout'
    assert install_advice("cuda12", "cuda13") in cudaprobe.FIX_INSTALL


def test_no_text_installs_an_extra_from_a_package_index():
    assert len(USER_TEXTS) > 10
    named = [f"{path.relative_to(ROOT)}: {match}" for path in USER_TEXTS
             for match in re.findall(r".{0,30}\bdcbg\[\w+\].{0,10}", path.read_text())]
    assert not named, f"extras named as if dcbg were on a package index: {named}"


def test_install_advice_has_one_home():
    """Only dcbg.errors words the install command; every message takes it from there"""
    sources = (ROOT / "src" / "dcbg").rglob("*.py")
    wording = [path.name for path in sources if "pip install" in path.read_text()]
    assert wording == ["errors.py"]


def test_without_dcnum_registering_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dcnum.feat.feat_background", None)
    with pytest.raises(ExtraNotInstalled, match=re.escape(
            'dcnum is not installed; install it with pip install ".[dcnum]" in the dcbg '
            'checkout to use dcbg inside dcnum.')):
        register()


def test_without_distributed_dask_runs_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    write_synthetic_rtdc(tmp_path / "rec.rtdc", 30, shape=(4, 8), seed=3)
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["compute", str(tmp_path), "-r", "--dask", "local:1", "-kb",
                 "kernel_size=10", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: Computing on a Dask cluster needs Dask's distributed package, which "
                   'is not installed; install it with pip install ".[dask]" in the dcbg '
                   "checkout.\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rec.rtdc"]


def test_a_setting_is_said_as_the_librarys_keyword_or_as_an_option():
    message = SettingMessage("CUDA device {index} cannot be used; or use {setting}.", "device",
                             ("cpu", "auto"), {"index": 2})
    assert message.render() == 'CUDA device 2 cannot be used; or use device="cpu" or "auto".'
    assert message.render("--device") == ("CUDA device 2 cannot be used; or use --device cpu "
                                           "or auto.")
    alone = SettingMessage("retry with fewer CPU workers ({setting}).", "num_cpus")
    assert alone.render() == "retry with fewer CPU workers (num_cpus)."
    assert alone.render("--num-cpus") == "retry with fewer CPU workers (--num-cpus)."
    worded = SettingMessage("{setting} {address} is no address.", "dask",
                            fields={"address": "x"}, words="The Dask address")
    assert worded.render() == "The Dask address x is no address."
    assert worded.render("--dask") == "--dask x is no address."


def test_an_error_carries_its_setting_also_through_pickling():
    """A Dask worker's error reaches the command line with its setting"""
    error = setting_error(DeviceError, "CUDA device {index} failed; use {setting}.", "device",
                          suggested=("cpu",), index=3)
    assert str(error) == 'CUDA device 3 failed; use device="cpu".'
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is DeviceError and str(copy) == str(error)
    assert (copy.setting, copy.suggested) == ("device", ("cpu",))
    assert copy.setting_message.render("--device") == "CUDA device 3 failed; use --device cpu."
