"""What users see: the preview PNG of a computed file, and dcbg info FILE"""
import numpy as np
from PIL import Image

import dcbg
from dcbg.cli import main
from dcbg.preview import render_preview


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
    # 40-pixel frames are shown 3x: three panels side by side, one row per event
    assert image.size == (3 * 120 * 3 + 4 * 8, 18 + 2 * (18 + 120 + 8) + 18 + 120 + 16)
    for boxes in preview.panels:
        raw, background, corrected = (crop(image, boxes[k])
                                      for k in ("raw", "background", "corrected"))
        assert raw.shape == background.shape == corrected.shape == (120, 360)
        assert np.abs(raw - background).mean() > 0.5  # noise and cells are gone
        assert abs(np.median(corrected) - 128) <= 2  # corrected is flat gray…
        assert np.abs(corrected - 128).max() > 60  # …apart from what is not background
        assert np.std(background) > 10  # walls and illumination remain
    strip = crop(image, preview.strip)
    assert strip.shape == (120, image.size[0] - 16) and strip.std() > 5


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
