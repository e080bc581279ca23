"""The description of an .rtdc file that `dcbg info FILE` prints"""
import h5py

from dcbg.rollmed import BackgroundRollMed
from dcbg.rtdc.describe import describe_file
from dcbg.synthetic import write_synthetic_rtdc


def test_an_output_is_described_line_by_line(tmp_path):
    source = write_synthetic_rtdc(tmp_path / "rec.rtdc", 40, shape=(6, 8), seed=4)
    target = tmp_path / "rec_bg.rtdc"
    with BackgroundRollMed(source, target, kernel_size=4, num_cpus=1, device="cpu") as bg:
        bg.process()
    lines = describe_file(target)
    assert next(lines) == f"{target}: 40 events of 6x8 pixels (through basin {source})"
    rest = list(lines)
    assert rest[0].startswith("image_bg: PPID rollmed:k=4^b=10000 (generation ")
    with h5py.File(target) as h5:
        assert rest[1].startswith(f"attributes: {len(h5.attrs)} (sample ")
    assert any(line.startswith("basin ") and str(source) in line and "(missing)" not in line
               for line in rest)
    assert any(line.startswith("log dcbg-background_") and "40 events on cpu" in line
               for line in rest)


def test_a_file_without_images_is_described_as_far_as_it_can_be(tmp_path):
    path = tmp_path / "features.rtdc"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/deform", data=[0.1, 0.2, 0.3])
    lines = list(describe_file(path))
    assert lines[0] == f"{path}: 3 events"
    assert lines[1].startswith("images: cannot be used: ") and "events/image" in lines[1]
    assert lines[2:] == ["image_bg: none in this file", "attributes: 0"]
