"""What `dcbg compute` does before its first read: the metadata probe runs while numpy and
h5py load"""
import subprocess
import sys

from dcbg.cli import main
from dcbg.rtdc import metadata_check as probe
from dcbg.synthetic import write_synthetic_rtdc

FILE_MODULES = ("numpy", "h5py", "numcodecs", "hdf5plugin")
"""What a run reads, computes and writes with, the bulk of its imports"""

STARTS_PROBE = """
import sys
from dcbg.rtdc import metadata_check as probe
loaded_at_start = []
start = probe.MetadataProbe.__init__

def recorded(self, *args, **kwargs):
    loaded_at_start.append(sorted(m for m in {modules!r} if m in sys.modules))
    start(self, *args, **kwargs)

probe.MetadataProbe.__init__ = recorded
from dcbg.cli import main
code = main(["compute", {source!r}, {target!r}, "-kb", "kernel_size=4", "--device", "cpu"])
print(loaded_at_start, code)
"""


def test_the_probe_starts_before_the_file_modules_load(tmp_path):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    script = STARTS_PROBE.format(modules=FILE_MODULES, source=str(source),
                                 target=str(tmp_path / "out.rtdc"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[[]] 0", "one probe, started before h5py loaded"
    assert (tmp_path / "out.rtdc").is_file()


PARSES = """
import sys
from dcbg.cli import build_parser
build_parser().parse_args(["compute", "in.rtdc", "--device", "cuda:1"])
print(sorted(m for m in {modules!r} if m in sys.modules))
"""


def test_the_command_line_and_its_commands_import_no_file_modules():
    """Every command's module is imported to build the parser: each loads the file modules
    where it runs, not when it is imported"""
    done = subprocess.run([sys.executable, "-c", PARSES.format(modules=FILE_MODULES)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]


def test_the_probe_is_joined_before_the_file_is_opened(tmp_path, monkeypatch):
    from dcbg import background
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    steps = []
    start, join, open_input = probe.MetadataProbe.__init__, probe.MetadataProbe.join, \
        background.open_input

    def started(self, *args, **kwargs):
        steps.append("start")
        start(self, *args, **kwargs)

    def joined(self):
        steps.append("join")
        join(self)

    def opened(*args, **kwargs):
        steps.append("open")
        return open_input(*args, **kwargs)

    monkeypatch.setattr(probe.MetadataProbe, "__init__", started)
    monkeypatch.setattr(probe.MetadataProbe, "join", joined)
    monkeypatch.setattr(background, "open_input", opened)
    assert main(["compute", str(source), "-kb", "kernel_size=4", "--device", "cpu"]) == 0
    assert steps == ["start", "join", "open"]


def test_the_kernel_loads_while_the_probe_reads(tmp_path, monkeypatch):
    """A device chosen by the command line starts loading its kernel (numba's, or a GPU's
    compile) before the run waits for the metadata probe"""
    from dcbg.devices import DeviceChoice
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    steps = []
    preload, join = DeviceChoice.preload, probe.MetadataProbe.join

    def preloading(self, *args, **kwargs):
        steps.append("preload")
        preload(self, *args, **kwargs)

    def joined(self):
        steps.append("join")
        join(self)

    monkeypatch.setattr(DeviceChoice, "preload", preloading)
    monkeypatch.setattr(probe.MetadataProbe, "join", joined)
    assert main(["compute", str(source), "-kb", "kernel_size=4", "--device", "cpu"]) == 0
    assert steps[:2] == ["preload", "join"], steps


def test_a_command_that_fails_first_ends_its_probe(tmp_path, monkeypatch):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    monkeypatch.setattr(probe, "PROBE_COMMAND",
                        [sys.executable, "-c", "import time; time.sleep(60)"])
    probes = []
    start = probe.MetadataProbe.__init__

    def kept(self, *args, **kwargs):
        start(self, *args, **kwargs)
        probes.append(self)

    monkeypatch.setattr(probe.MetadataProbe, "__init__", kept)
    assert main(["compute", str(source), "-kb", "kernel_size=3", "--device", "cpu"]) == 1
    (started,) = probes
    assert started._child.poll() is not None, "the probe's child still runs"
    assert not (tmp_path / "rec_bg.rtdc").exists()


READS_ZSTD = """
import h5py
import numpy as np
import dcbg
from dcbg.rtdc.reader import ImageSource
with h5py.File({source!r}) as h5:
    image = h5["events/image"]
    out = np.empty((40, 24), np.uint8)
    ImageSource(image).read_into(0, 40, out)  # through h5py: no codec threads
    print(dcbg.rolling_median(image, 4).shape, int(out.sum()) > 0)
"""


def test_zstd_frames_read_through_h5py_in_a_fresh_process(tmp_path):
    """dcbg registers the Zstandard filter with h5py wherever it reads or writes through
    it, now that importing dcbg no longer loads the whole package"""
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(4, 6), seed=1)
    done = subprocess.run([sys.executable, "-c", READS_ZSTD.format(source=str(source))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(37,", "4,", "6)", "True"]
