"""The settings of a run: each read and decided once, before the run, and handed on"""
import logging

import pytest

import dcbg
from dcbg import settings
from dcbg.rtdc import writer
from dcbg.synthetic import write_synthetic_rtdc
from dcbg.system import available_cpus


@pytest.mark.parametrize("compression,decided", [
    (True, "zstd-5"), ("zstd-1", "zstd-1"), ("zstd-9", "zstd-9"), (False, "none"),
    (None, "none"), ("none", "none")])
def test_compression_has_one_spelling(compression, decided):
    assert settings.parse_compression(compression) == decided
    assert settings.parse_compression(decided) == decided


@pytest.mark.parametrize("compression", ["zstd-0", "zstd-10", "gzip", "zstd", 5])
def test_unknown_compressions_are_refused(compression):
    with pytest.raises(ValueError, match="Unknown compression"):
        settings.parse_compression(compression)


def test_requests_beyond_the_cpus_are_capped_with_the_reason():
    cpus = available_cpus()
    assert settings.num_cpus_setting(cpus) == (cpus, None)
    assert settings.num_cpus_setting(None) == (cpus, None)
    assert settings.num_cpus_setting(cpus + 5) == (
        cpus, f"{cpus + 5} CPU workers were asked for, but this process may use {cpus} CPUs; "
              f"starting {cpus}")
    assert settings.io_threads_setting(cpus + 1)[1].startswith(
        f"{cpus + 1} I/O threads were asked for")
    with pytest.raises(ValueError, match="num_cpus must be a positive integer, got 0"):
        settings.num_cpus_setting(0)


def test_a_run_decides_every_setting_before_it_starts(monkeypatch, caplog):
    monkeypatch.setattr(settings, "_warned", set())
    cpus = available_cpus()
    with caplog.at_level(logging.WARNING, logger="dcbg"):
        decided = settings.decide_run_settings(False, cpus + 1, cpus + 2, "ALL")
        again = settings.decide_run_settings(False, cpus + 1, cpus + 2, "ALL")
    assert (decided.compression, decided.num_cpus, decided.io_threads, decided.verify) == (
        "none", cpus, cpus, "all")
    assert again == decided and len(decided.warnings) == 2
    assert decided.record() == {"compression": "none", "num_cpus": cpus, "io_threads": cpus,
                                "verify": "all"}
    # the workers' cap is logged for every run, the codec threads' once per process
    logged = [record.getMessage() for record in caplog.records]
    assert logged == [decided.warnings[0], decided.warnings[1], decided.warnings[0]]


def test_the_first_setting_that_is_wrong_is_the_error():
    with pytest.raises(ValueError, match="num_cpus"):
        settings.decide_run_settings("gzip", 0, 0, "none of them")
    with pytest.raises(ValueError, match="io_threads"):
        settings.decide_run_settings("gzip", 1, 0, "none of them")
    with pytest.raises(ValueError, match="Unknown compression"):
        settings.decide_run_settings("gzip", 1, 1, "none of them")
    with pytest.raises(ValueError, match="Unknown verify"):
        settings.decide_run_settings("zstd-5", 1, 1, "none of them")


def test_a_run_reads_its_compression_once_and_the_writer_takes_it_decided(tmp_path,
                                                                          monkeypatch):
    read = []
    parse = settings.parse_compression

    def counted(value):
        read.append(value)
        return parse(value)

    monkeypatch.setattr(settings, "parse_compression", counted)
    if hasattr(writer, "parse_compression"):  # a writer that reads it again is counted too
        monkeypatch.setattr(writer, "parse_compression", counted)
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 60, shape=(8, 16), seed=2)
    read.clear()
    with dcbg.BackgroundRollMed(source, tmp_path / "out.rtdc", kernel_size=4, compress=True,
                                num_cpus=1, device="cpu") as bg:
        bg.process()
    assert read == [True]
    assert bg.settings.compression == bg.compress == "zstd-5"
