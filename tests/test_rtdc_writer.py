"""Writing image_bg chunk by chunk, its filters and attributes, and an output's metadata"""
import concurrent.futures
import random

import h5py
import hdf5plugin
import numpy as np
import pytest
from dcnum.meta.ppid import DCNUM_PPID_GENERATION

from dcbg.rtdc import writer as writer_module
from dcbg.rtdc.writer import ImageBgWriter, chunk_events, compression_filters, copy_metadata
from dcbg.synthetic import synthetic_stack

SHAPE = (4, 5)
COUNT = 47
CHUNK = 10  # events per chunk once CHUNK_BYTES is shrunk to 200
FRAMES = synthetic_stack(COUNT, shape=SHAPE, seed=8)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 10 frames of 4x5 pixels, so that a few frames span several chunks"""
    monkeypatch.setattr(writer_module, "CHUNK_BYTES", CHUNK * SHAPE[0] * SHAPE[1])


@pytest.fixture
def h5(tmp_path):
    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        yield h5


def stored_chunks(writer):
    """Record the chunk offsets the writer hands to HDF5, in order"""
    offsets = []
    write_direct = writer._write_direct

    def recording(offset, stored):
        offsets.append(offset[0])
        write_direct(offset, stored)

    writer._write_direct = recording
    return offsets


def raw_chunks(dataset):
    return [dataset.id.read_direct_chunk((i * dataset.chunks[0], 0, 0))[1]
            for i in range(-(-len(dataset) // dataset.chunks[0]))]


@pytest.mark.parametrize("compression,level", [
    ("zstd-5", 5), ("zstd-1", 1), ("zstd-9", 9), ("none", None)])
def test_compression_filters_for_each_decided_setting(compression, level):
    filters = compression_filters(compression)
    expected = {"fletcher32": True}
    if level is not None:
        expected.update(hdf5plugin.Zstd(clevel=level))
        assert filters["compression"] == 32015 and tuple(filters["compression_opts"]) == (level,)
    assert filters == expected


@pytest.mark.parametrize("shape,events", [
    ((80, 320), 40),  # dcnum's about 1 MiB
    ((64, 64), 256),
    ((12, 20), 1000),  # small frames: at most 1000 events
    ((1024, 1024), 10),  # large frames: at least 10 events
    ((250, 400), 10),
])
def test_chunk_events(shape, events):
    assert chunk_events(shape) == events
    assert chunk_events(shape) * shape[0] * shape[1] <= 1024**2 or events == 10


def test_dataset_has_the_image_attributes_and_1_mib_chunks(h5):
    h5.create_dataset("events/image_bg", data=np.ones((3, 2, 2), np.uint8))  # replaced
    writer = ImageBgWriter(h5.require_group("events"), (80, 320), 100, "zstd-3")
    dataset = h5["events/image_bg"]
    assert writer.dataset == dataset
    assert (dataset.shape, dataset.maxshape, dataset.dtype) == ((100, 80, 320),
                                                                (None, 80, 320), np.uint8)
    assert dataset.chunks == (40, 80, 320)
    assert 0.95 * 1024**2 < 40 * 80 * 320 <= 1024**2
    assert dataset.fletcher32
    assert dataset._filters["32015"] == (3,)
    assert {key: dataset.attrs[key] for key in ("CLASS", "IMAGE_VERSION", "IMAGE_SUBCLASS")} \
        == {"CLASS": b"IMAGE", "IMAGE_VERSION": b"1.2", "IMAGE_SUBCLASS": b"IMAGE_GRAYSCALE"}
    assert writer.target == h5.filename


def write_pieces(h5, pieces, threads=1, codec_threads=0):
    """Write FRAMES as the given (start, stop) pieces, from `threads` threads at once"""
    with concurrent.futures.ThreadPoolExecutor(max(codec_threads, 1)) as pool:
        writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT,
                               pool=pool if codec_threads else None)
        if threads == 1:
            for start, stop in pieces:
                writer.write_at(start, FRAMES[start:stop])
        else:
            with concurrent.futures.ThreadPoolExecutor(threads) as senders:
                for future in [senders.submit(writer.write_at, start, FRAMES[start:stop])
                               for start, stop in pieces]:
                    future.result()
        writer.check_complete()
    return writer.dataset


def random_pieces(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, COUNT), 9))
    pieces = list(zip([0, *cuts], [*cuts, COUNT], strict=True))
    rng.shuffle(pieces)
    return pieces


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_frames_in_any_order_from_several_threads_give_the_same_dataset(small_chunks,
                                                                        tmp_path, seed):
    with h5py.File(tmp_path / "in_order.h5", "w") as h5:
        expected = raw_chunks(write_pieces(h5, [(0, COUNT)]))
        assert np.array_equal(h5["events/image_bg"][:], FRAMES)
    for threads, codec_threads in ((1, 0), (4, 0), (4, 3)):
        with h5py.File(tmp_path / f"{threads}_{codec_threads}.h5", "w") as h5:
            dataset = write_pieces(h5, random_pieces(seed), threads, codec_threads)
            assert np.array_equal(dataset[:], FRAMES)
            assert raw_chunks(dataset) == expected


def test_a_chunk_is_stored_once_all_its_frames_arrived_and_only_then(small_chunks, h5):
    writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT)
    stored = stored_chunks(writer)
    writer.write_at(3, FRAMES[3:8])
    writer.write_at(41, FRAMES[41:45])
    assert stored == [] and sorted(writer._partial) == [0, 4]
    writer.write_at(12, FRAMES[12:38])  # completes chunk 2, starts chunks 1 and 3
    assert stored == [20] and sorted(writer._partial) == [0, 1, 3, 4]
    writer.write_at(8, FRAMES[8:10])
    writer.write_at(0, FRAMES[0:3])
    assert stored == [20, 0] and sorted(writer._partial) == [1, 3, 4]
    writer.write_at(38, FRAMES[38:41])  # the last chunk holds only 7 frames
    writer.write_at(45, FRAMES[45:47])
    assert stored == [20, 0, 30, 40] and sorted(writer._partial) == [1]
    writer.write_at(10, FRAMES[10:12])
    assert stored == [20, 0, 30, 40, 10] and writer._partial == {}
    writer.check_complete()
    assert np.array_equal(h5["events/image_bg"][:], FRAMES)


def test_frames_can_be_reused_once_write_at_returns(small_chunks, h5):
    writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT)
    frames = FRAMES.copy()
    writer.write_at(0, frames[:15])
    frames[:15] = 0  # the caller's buffer is refilled with the next batch
    writer.write_at(15, frames[15:])
    writer.check_complete()
    assert np.array_equal(h5["events/image_bg"][:], FRAMES)


def test_write_repeated_encodes_one_whole_chunk_and_writes_the_rest(small_chunks, h5,
                                                                    monkeypatch):
    writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT)
    encoded = []
    encode = writer.codec.encode
    monkeypatch.setattr(writer.codec, "encode", lambda data: encoded.append(len(data))
                        or encode(data))
    writer.write_at(0, FRAMES[:6])
    writer.write_repeated(6, FRAMES[6], COUNT - 6)  # part of chunk 0, chunks 1 to 3, the end
    writer.check_complete()
    assert encoded == [CHUNK, CHUNK, CHUNK], "chunk 0, one whole chunk of copies, the end"
    expected = FRAMES.copy()
    expected[6:] = FRAMES[6]
    dataset = h5["events/image_bg"]
    assert np.array_equal(dataset[:], expected)
    chunks = raw_chunks(dataset)
    assert chunks[1] == chunks[2] == chunks[3] != chunks[4]


@pytest.mark.parametrize("count", [0, -3])
def test_write_repeated_of_nothing_writes_nothing(small_chunks, h5, count):
    writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT)
    stored = stored_chunks(writer)
    writer.write_repeated(15, FRAMES[0], count)  # inside a chunk
    assert stored == [] and writer._partial == {}


@pytest.mark.parametrize("missing", [(0, 1), (19, 20), (20, 30), (46, 47), (5, 25)])
def test_check_complete_names_the_first_missing_frame(small_chunks, h5, missing):
    writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT, target="/data/out.rtdc")
    writer.write_at(0, FRAMES[:missing[0]])
    writer.write_at(missing[1], FRAMES[missing[1]:])
    first = missing[0] // CHUNK * CHUNK  # as far as the writer knows: its chunk's first
    with pytest.raises(RuntimeError, match=f"^image_bg of /data/out.rtdc misses frames from "
                                           f"{first} on; this is a bug in dcbg"):
        writer.check_complete()
    writer.write_at(missing[0], FRAMES[missing[0]:missing[1]])
    writer.check_complete()


@pytest.mark.parametrize("offset,count", [(-1, 2), (COUNT - 2, 3), (COUNT, 1), (-5, 60)])
def test_frames_outside_the_dataset_are_refused_and_nothing_is_written(small_chunks, h5,
                                                                       offset, count):
    writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT)
    stored = stored_chunks(writer)
    with pytest.raises(ValueError, match=f"^frames {offset} to {offset + count - 1} lie "
                                         f"outside image_bg, which has {COUNT} frames"):
        writer.write_at(offset, np.zeros((count, *SHAPE), np.uint8))
    assert stored == [] and writer._partial == {}


def test_set_ppid_writes_dcnums_attributes(h5):
    writer = ImageBgWriter(h5.require_group("events"), SHAPE, COUNT)
    writer.set_ppid("rollmed:k=100^b=10000")
    attrs = h5["events/image_bg"].attrs
    assert attrs["dcnum ppid background"] == "rollmed:k=100^b=10000"
    assert attrs["dcnum ppid generation"] == DCNUM_PPID_GENERATION


def test_copy_metadata_copies_attributes_logs_and_tables(tmp_path):
    table = np.array([(1.5, 2), (3.0, 4)], dtype=[("pressure", "f8"), ("step", "i4")])
    with h5py.File(tmp_path / "in.rtdc", "w") as src:
        src.attrs["experiment:sample"] = "blood"
        src.attrs["imaging:pixel size"] = 0.34
        src.attrs["setup:flow rate"] = np.float64(0.06)
        src["logs/acquisition"] = np.array([b"started", b"stopped"])
        src["logs/acquisition"].attrs["software"] = "Shape-In"
        src["tables/pressure"] = table
        src["events/image"] = np.zeros((2, 3, 3), np.uint8)
    with h5py.File(tmp_path / "in.rtdc") as src, h5py.File(tmp_path / "out.rtdc", "w") as dst:
        dst.attrs["experiment:sample"] = "old"
        copy_metadata(src, dst)
    with h5py.File(tmp_path / "out.rtdc") as dst:
        assert dict(dst.attrs) == {"experiment:sample": "blood", "imaging:pixel size": 0.34,
                                   "setup:flow rate": 0.06}
        assert list(dst["logs/acquisition"][:]) == [b"started", b"stopped"]
        assert dst["logs/acquisition"].attrs["software"] == "Shape-In"
        assert np.array_equal(dst["tables/pressure"][:], table)
        assert "events" not in dst, "the events are not metadata"


def test_copy_metadata_without_logs_or_tables(tmp_path):
    with h5py.File(tmp_path / "in.rtdc", "w") as src, \
            h5py.File(tmp_path / "out.rtdc", "w") as dst:
        src.attrs["experiment:run index"] = 3
        copy_metadata(src, dst)
        assert dict(dst.attrs) == {"experiment:run index": 3}
        assert list(dst) == []
