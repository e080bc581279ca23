"""What users see: the preview PNG of a computed file, and dcbg info FILE"""
import subprocess
import sys

import h5py
import numpy as np
from PIL import Image

import dcbg
from dcbg import preview
from dcbg.cli import main
from dcbg.preview import render_preview, write_preview
from dcbg.synthetic import background_pattern


def crop(image, box):
    return np.asarray(image.crop(box), dtype=np.int16)


def test_preview_png_shows_what_it_should(computed, capsys):
    _, output = computed
    assert main(["preview", str(output), "-e", "5", "-e", "250", "-o",
                 str(output.with_name("p.png"))]) == 0
    png = output.with_name("p.png")
    assert capsys.readouterr().out.strip() == str(png)
    image = Image.open(png)
    preview = render_preview(output, [5, 250])
    assert image.mode == "L" and image.size == preview.image.size
    assert np.array_equal(np.asarray(image), np.asarray(preview.image))
    # 40-pixel frames are shown 3x: three panels side by side, one row per event, bands of
    # text for the title, the column titles, each event, the strip and its event numbers
    assert image.size == (3 * 120 * 3 + 4 * 8, 18 + 18 + 2 * (18 + 120 + 8) + 18 + 120 + 18 + 8)
    for boxes in preview.panels:
        raw, background, corrected = (crop(image, boxes[k])
                                      for k in ("raw", "background", "corrected"))
        assert raw.shape == background.shape == corrected.shape == (120, 360)
        assert np.abs(raw - background).mean() > 0.5  # noise and cells are gone
        assert abs(np.median(corrected) - 128) <= 2  # corrected is flat gray…
        assert np.abs(corrected - 128).max() > 60  # …apart from what is not background
        assert np.std(background) > 10  # walls and illumination remain
    strip = crop(image, preview.strip)
    assert preview.strip[0] > 8 and preview.strip[2] == image.size[0] - 8  # pixel axis at left
    assert strip.shape == (120, preview.strip[2] - preview.strip[0]) and strip.std() > 5


def ink(image, box):
    """Where text or tick marks were drawn in `box`: pixels darker than the white canvas"""
    return crop(image, box) < 128


def inked_width(image, box) -> int:
    """Width of what was drawn in `box`, from its leftmost to its rightmost dark pixel"""
    columns = np.flatnonzero(ink(image, box).any(axis=0))
    return int(columns[-1] - columns[0] + 1) if len(columns) else 0


def test_preview_titles_its_columns_and_marks_the_strips_axes(computed):
    _, output = computed
    shown = render_preview(output, [5, 250])
    image = shown.image
    first = shown.panels[0]
    for name in ("raw", "background", "corrected"):
        left, top, right, bottom = shown.titles[name]
        assert left == first[name][0] and right >= first[name][2]  # over its column
        assert bottom < first[name][1]  # above the first event, in a band of its own
        assert ink(image, shown.titles[name]).any(), name
    # "raw", "background" and "raw - background": three texts of growing length
    widths = [inked_width(image, shown.titles[name])
              for name in ("raw", "background", "corrected")]
    assert 0 < widths[0] < widths[1] < widths[2], widths

    left, top, right, bottom = shown.strip
    # the event numbers under the strip: 0 at its left end, 399 at its right end
    events = ink(image, shown.axes["events"])
    assert shown.axes["events"][1] == bottom and events.any()
    assert events[:, :12].any() and events[:, -24:].any()
    columns = 400  # every event is one column of the strip
    for event in preview.event_ticks(400):
        x = left + int((event + 0.5) * (right - left) / columns)
        assert image.getpixel((x, bottom)) == 0, event  # its tick mark
    # the pixels of the row at the strip's left: 0 at the top, 119 at the bottom
    pixels = ink(image, shown.axes["pixels"])
    assert shown.axes["pixels"][2] == left
    assert pixels[:12].any() and pixels[-12:].any() and not pixels[40:80].any()


def test_strip_ticks_are_round_event_numbers_from_the_first_to_the_last():
    assert preview.event_ticks(1) == [0]
    assert preview.event_ticks(3) == [0, 1, 2]
    assert preview.event_ticks(400) == [0, 50, 100, 150, 200, 250, 300, 350, 399]
    assert preview.event_ticks(5000) == [0, 1000, 2000, 3000, 4000, 4999]
    # 140,000 would crowd 150,000: a multiple within half a step of the last is left out
    assert preview.event_ticks(150_001) == [0, 20_000, 40_000, 60_000, 80_000, 100_000,
                                            120_000, 150_000]


def test_preview_draws_its_texts_with_pillows_bitmap_font(computed, monkeypatch):
    """Where FreeType is missing (or Pillow is older than 10.1) the default font is a bitmap"""
    from PIL import ImageFont
    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    if bitmap is None:  # Pillow < 10.1, whose default font is the bitmap one anyway
        bitmap = ImageFont.load_default
    monkeypatch.setattr(preview, "_font", lambda size=12: bitmap())
    _, output = computed
    shown = render_preview(output, [5, 250])
    assert all(ink(shown.image, box).any() for box in shown.titles.values())


def test_preview_picks_events_and_works_on_a_file_with_image_bg(computed, tmp_path):
    source, output = computed
    inplace = tmp_path / "inplace.rtdc"
    inplace.write_bytes(source.read_bytes())
    with dcbg.BackgroundRollMed(inplace, inplace, kernel_size=8, num_cpus=1,
                                device="cpu") as bg:
        bg.process()
    assert main(["preview", str(inplace)]) == 0
    png = tmp_path / "inplace_preview.png"
    assert Image.open(png).size[0] == 3 * 360 + 32
    assert len(render_preview(inplace).events) == 3


def test_preview_errors(computed, capsys):
    source, output = computed
    assert main(["preview", str(output), "-e", "400"]) == 1
    assert "Event 400 does not exist" in capsys.readouterr().err
    assert main(["preview", str(source)]) == 1
    err = capsys.readouterr().err
    assert "has no events/image_bg" in err and "dcbg compute rec.rtdc" in err


def test_info_describes_a_file(computed, capsys):
    source, output = computed
    assert main(["info", str(output)]) == 0
    out = capsys.readouterr().out
    assert f"400 events of 40x120 pixels (through basin {source})" in out
    assert "image_bg: PPID rollmed:k=20^b=100 (generation 13)" in out
    assert "basin 'rec.rtdc': file/hdf5" in out and "(missing)" not in out
    assert "log dcbg-background_" in out and "400 events on cpu" in out
    assert main(["info", str(source)]) == 0
    assert "image_bg: none in this file" in capsys.readouterr().out


def write_recording(path, image, image_bg):
    """A minimal uncompressed .rtdc file with the given frames and backgrounds"""
    with h5py.File(path, "w") as h5:
        h5["events/image"] = image
        h5["events/image_bg"] = image_bg
    return path


def test_preview_panels_stay_readable_and_bounded_for_any_frame_shape(tmp_path):
    wide = render_preview(write_recording(
        tmp_path / "wide.rtdc", np.full((3, 40, 120), 100, np.uint8),
        np.full((3, 40, 120), 100, np.uint8)))
    # (height, width): flat, one-row, tall and narrow, large
    for shape in [(4, 400), (1, 5000), (400, 4), (600, 900)]:
        frames = np.random.default_rng(1).integers(90, 130, (3, *shape), dtype=np.uint8)
        path = write_recording(tmp_path / f"{shape[0]}x{shape[1]}.rtdc", frames,
                               np.full_like(frames, 110))
        shown = render_preview(path)
        width, height = shown.image.size
        # three panels of at most 640x240 side by side, three events, a strip of 40…160 rows
        assert width <= 3 * 640 + 4 * 8, shape
        assert height <= 18 + 18 + 3 * (18 + 240 + 8) + 18 + 160 + 18 + 8, shape
        for boxes in shown.panels:
            left, top, right, bottom = boxes["raw"]
            assert 24 <= right - left <= 640 and 24 <= bottom - top <= 240, shape
        assert shown.strip[3] - shown.strip[1] >= 40, shape
        # each column's title is whole, also over panels narrower than it
        titles = [inked_width(shown.image, shown.titles[name])
                  for name in ("raw", "background", "corrected")]
        assert titles == [inked_width(wide.image, wide.titles[name])
                          for name in ("raw", "background", "corrected")], shape
    # where neither limit binds, the aspect ratio is kept: 600x900 frames are shrunk to 240x360
    assert (right - left, bottom - top) == (360, 240)


def test_preview_refuses_more_events_than_fit(computed, capsys):
    _, output = computed
    events = [arg for event in range(11) for arg in ("-e", str(event))]
    assert main(["preview", str(output), *events, "-o", str(output.with_name("many.png"))]) == 1
    assert "at most 10 events, but 11 were asked for" in capsys.readouterr().err
    assert not output.with_name("many.png").exists()


def test_preview_picks_frames_with_cells_over_noisy_flickering_empty_ones(tmp_path):
    # Empty frames are brighter (lamp flicker) and noisier than the frames with a cell,
    # so that their mean difference from the background is the larger one
    rng = np.random.default_rng(7)
    scene = background_pattern((30, 60), seed=5)
    y, x = np.mgrid[:30, :60]
    with_cells = [1, 6, 10]
    frames = []
    for event in range(12):
        if event in with_cells:
            frame = scene + rng.normal(0, 2, scene.shape)
            cell = (y - 15) ** 2 + (x - rng.integers(8, 52)) ** 2 < 9
            frame[cell] -= 35
        else:
            frame = scene * 1.08 + rng.normal(0, 5, scene.shape)
        frames.append(frame)
    image = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    image_bg = np.repeat(np.rint(scene).astype(np.uint8)[None], len(image), axis=0)
    path = write_recording(tmp_path / "cells.rtdc", image, image_bg)
    assert render_preview(path).events == with_cells


def test_preview_output_suffix_chooses_the_format(computed, tmp_path, capsys):
    _, output = computed
    for name, file_format in [("p.jpg", "JPEG"), ("p.JPEG", "JPEG"), ("p.PNG", "PNG")]:
        assert main(["preview", str(output), "-e", "5", "-o", str(tmp_path / name)]) == 0
        assert Image.open(tmp_path / name).format == file_format


def test_preview_refuses_an_unknown_suffix_before_rendering(computed, tmp_path, capsys,
                                                            monkeypatch):
    _, output = computed

    def render_fails(*args, **kwargs):
        raise AssertionError("rendered a preview that cannot be written")
    monkeypatch.setattr(preview, "render_preview", render_fails)
    for name, suffix in [("p.gif", "the suffix '.gif'"), ("p", "no suffix")]:
        assert main(["preview", str(output), "-o", str(tmp_path / name)]) == 1
        assert capsys.readouterr().err == (
            f"error: The preview {tmp_path / name} has {suffix}, which dcbg cannot write; "
            f"end its name with .png, .jpg or .jpeg.\n")
    assert list(tmp_path.iterdir()) == []


def test_preview_writes_an_output_whose_name_is_as_long_as_a_name_can_be(computed, tmp_path):
    _, output = computed
    png = tmp_path / ("p" * 251 + ".png")
    assert write_preview(output, png, [5]) == png
    assert Image.open(png).format == "PNG"
    assert list(tmp_path.iterdir()) == [png]  # no partial file left behind


def test_preview_reads_compressed_frames_without_other_dcbg_modules_loaded(computed):
    # the command line loads the Zstandard filter anyway; the Python API alone must too
    _, output = computed
    script = ("import sys; from dcbg.preview import render_preview; "
              "assert 'dcbg.rtdc.writer' not in sys.modules; "
              "print(render_preview(sys.argv[1], [5]).image.size)")
    run = subprocess.run([sys.executable, "-c", script, str(output)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
