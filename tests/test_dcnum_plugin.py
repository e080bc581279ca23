"""dcbg as dcnum's "rollmed" backend: a whole DCNumJobRunner job, byte for byte"""
import shutil

import h5py
import numpy as np
import pytest

import dcbg
from dcbg.synthetic import write_synthetic_rtdc
from helpers.files import (
    assert_background_added,
    assert_only_run_logs_added,
    dataset_digests,
    existing_output,
    file_size_after_reruns,
    folder_state,
)

dcnum = pytest.importorskip("dcnum", reason="dcnum is not installed (extra 'dcnum')")
from dcnum.feat.feat_background import get_available_background_methods  # noqa: E402
from dcnum.logic import DCNumJobRunner, DCNumPipelineJob  # noqa: E402


def run_job(source, target):
    job = DCNumPipelineJob(path_in=source, path_out=target, background_code="rollmed",
                           background_kwargs={"kernel_size": 20, "batch_size": 150},
                           num_procs=1, debug=True)
    with DCNumJobRunner(job=job) as runner:
        runner.run()
        assert runner.error_tb is None, runner.error_tb
    with h5py.File(target) as h5:
        return (h5["events/image_bg"][:], dict(h5["events/image_bg"].attrs),
                {k: v for k, v in h5.attrs.items() if k.startswith("pipeline:")})


@pytest.mark.slow
def test_dcnum_job_runs_through_dcbg_with_identical_bytes_and_ppids(tmp_path, monkeypatch):
    monkeypatch.setenv("DCBG_DEVICE", "cpu")
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 600, shape=(80, 320), seed=21)
    # dcnum's own rollmed first, then the same job with dcbg registered
    assert get_available_background_methods()["rollmed"].__module__.startswith("dcnum.")
    plain = run_job(source, tmp_path / "plain.rtdc")

    calls = []
    process = dcbg.BackgroundRollMed.process
    monkeypatch.setattr(dcbg.BackgroundRollMed, "process",
                        lambda self: (calls.append(self.image_count), process(self))[1])
    adapter = dcbg.register_with_dcnum()
    assert dcbg.dcnum_plugin.register() is adapter  # safe to call twice
    assert get_available_background_methods()["rollmed"] is adapter
    shutil.copy(source, tmp_path / "rec2.rtdc")
    through_dcbg = run_job(tmp_path / "rec2.rtdc", tmp_path / "dcbg.rtdc")

    assert calls == [600], "the job's background ran through dcbg"
    assert np.array_equal(through_dcbg[0], plain[0])
    assert through_dcbg[2]["pipeline:dcnum background"] == "rollmed:k=20^b=150"
    assert through_dcbg[1] == plain[1]
    assert through_dcbg[2] == plain[2]  # every pipeline PPID, the hash and the yield
    assert adapter.get_ppid_from_ppkw({"kernel_size": 20, "batch_size": 150}) == \
        "rollmed:k=20^b=150"
    assert adapter.get_ppkw_from_ppid("rollmed:k=20^b=150") == {"kernel_size": 20,
                                                                "batch_size": 150}


def test_a_dcbg_output_is_a_dcnum_input(tmp_path, monkeypatch):
    """dcnum copies the basins of its input, which needs their "features" entry"""
    monkeypatch.setenv("DCBG_DEVICE", "cpu")
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 300, shape=(80, 320), seed=22)
    with dcbg.BackgroundRollMed(source, tmp_path / "rec_bg.rtdc", kernel_size=20,
                                batch_size=150) as bg:
        bg.process()
    from_output = run_job(tmp_path / "rec_bg.rtdc", tmp_path / "from_output.rtdc")
    from_source = run_job(source, tmp_path / "from_source.rtdc")
    assert np.array_equal(from_output[0], from_source[0])


def test_the_plugin_never_writes_over_the_file_a_basin_reads(tmp_path):
    """dcnum code asking for the input's basin file as output gets a clear refusal"""
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 80, shape=(8, 16), seed=23)
    via_basin = tmp_path / "rec_bg.rtdc"
    with dcbg.BackgroundRollMed(source, via_basin, kernel_size=4, device="cpu") as bg:
        bg.process()
    before = folder_state(tmp_path)
    dcbg.register_with_dcnum()
    rollmed = get_available_background_methods()["rollmed"]
    with pytest.raises(dcbg.errors.OutputError, match="reads its data from through its basins"):
        rollmed(via_basin, source, kernel_size=4, batch_size=20, num_cpus=1)
    assert folder_state(tmp_path) == before


def test_the_plugin_adds_image_bg_to_an_existing_output_as_dcnum_does(tmp_path, monkeypatch):
    monkeypatch.setenv("DCBG_DEVICE", "cpu")
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 200, shape=(80, 160), seed=24)
    out = existing_output(tmp_path / "analysis.rtdc")
    before = dataset_digests(out)
    dcbg.register_with_dcnum()
    with get_available_background_methods()["rollmed"](
            source, out, kernel_size=4, batch_size=20, num_cpus=1) as bg:
        bg.process()
    assert_background_added(source, out, before)


def test_reruns_through_the_plugin_do_not_grow_the_file(tmp_path, monkeypatch):
    """dcnum's Background writes into an existing output; a re-run leaves no dead space"""
    monkeypatch.setenv("DCBG_DEVICE", "cpu")
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 300, shape=(80, 160), seed=25)
    out = tmp_path / "rec_bg.rtdc"
    dcbg.register_with_dcnum()
    rollmed = get_available_background_methods()["rollmed"]

    def run():
        with rollmed(source, out, kernel_size=4, batch_size=20, num_cpus=1) as bg:
            bg.process()

    fresh, before, sizes = file_size_after_reruns(run, out)
    assert max(sizes) <= 1.01 * fresh, (fresh, sizes)
    assert_only_run_logs_added(before, dataset_digests(out), runs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.rtdc", "rec_bg.rtdc"]
