"""Chunks decoded and encoded outside HDF5 give exactly what h5py reads and writes"""
import concurrent.futures

import dclab
import h5py
import hdf5plugin
import numpy as np
import pytest

from dcbg import errors
from dcbg.rtdc import chunks
from dcbg.rtdc.reader import ImageSource
from dcbg.rtdc.writer import ImageBgWriter
from dcbg.synthetic import synthetic_stack

FRAMES = synthetic_stack(203, shape=(12, 20), seed=21)

LAYOUTS = {
    "zstd": {"chunks": (16, 12, 20), **hdf5plugin.Zstd(clevel=5)},
    "zstd+fletcher32": {"chunks": (16, 12, 20), **hdf5plugin.Zstd(clevel=3),
                        "fletcher32": True},
    "deflate+shuffle": {"chunks": (9, 12, 20), "compression": "gzip",
                        "compression_opts": 4, "shuffle": True},
    "deflate+fletcher32": {"chunks": (25, 12, 20), "compression": "gzip",
                           "fletcher32": True},
    "no compression": {"chunks": (7, 12, 20)},
    "contiguous": {},
    "lz4 (h5py reads it)": {"chunks": (16, 12, 20), **hdf5plugin.LZ4()},
    "chunks that split frames": {"chunks": (5, 6, 20), **hdf5plugin.Zstd()},
}


DECODED_BY_DCBG = {"zstd", "zstd+fletcher32", "deflate+shuffle", "deflate+fletcher32",
                   "no compression"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunks") / "layouts.h5"
    with h5py.File(path, "w") as h5:
        for name, options in LAYOUTS.items():
            h5.create_dataset(name, data=FRAMES, **options)
    return path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_decoded_frames_equal_h5pys(stored, layout, threads):
    with h5py.File(stored) as h5, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        dataset = h5[layout]
        source = ImageSource(dataset, pool=pool)
        assert (source.chunked is not None) == (layout in DECODED_BY_DCBG)
        out = np.full((90, 12 * 20), 0xAB, np.uint8)
        # batch borders inside chunks, on them, a single frame, the ragged end
        for start, stop in [(0, 90), (3, 50), (16, 32), (17, 18), (150, 203), (198, 203)]:
            out[:] = 0xAB
            source.read_into(start, stop, out)
            assert np.array_equal(out[:stop - start].reshape(-1, 12, 20), FRAMES[start:stop])
            assert (out[stop - start:] == 0xAB).all(), "nothing beyond the batch is touched"
        rows = np.array([200, 3, 3, 17, 150, 0])  # a mapped basin: any order, repeats
        mapped = ImageSource(dataset, pool=pool, mapping=rows)
        mapped.read_into(0, len(rows), out)
        assert np.array_equal(out[:len(rows)].reshape(-1, 12, 20), FRAMES[rows])


def test_checksum_equals_hdf5s_for_odd_and_even_lengths(cpu_build, tmp_path):
    rng = np.random.default_rng(3)
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        for size in (1, 2, 3, 255, 8191, 8192, 8193, 300001):
            for data in (rng.integers(0, 256, size, np.uint8), np.zeros(size, np.uint8),
                         np.full(size, 255, np.uint8)):
                dataset = h5.create_dataset(f"d{size}_{data[0]}_{data[-1]}_{len(h5)}",
                                            data=data, chunks=(size,), fletcher32=True)
                _, raw = dataset.id.read_direct_chunk((0,))
                assert chunks.fletcher32(raw[:-4]) == int.from_bytes(
                    raw[-4:], "little")


def test_zstd_frame_header_gives_the_declared_size():
    frame = chunks.ChunkCodec([chunks.Filter(chunks.ZSTD, (5,))], (4, 300)).encode(
        np.zeros((4, 300), np.uint8))
    assert chunks.zstd_content_size(frame) == 1200
    with pytest.raises(chunks.ChunkError, match="no Zstandard frame"):
        chunks.zstd_content_size(b"not zstd at all")


def write_frames(path, compression, threads, frames=FRAMES):
    with h5py.File(path, "w") as h5, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        writer = ImageBgWriter(h5.require_group("events"), frames.shape[1:], len(frames),
                               compression, pool=pool)
        # out of order and in pieces that cut chunks, as the ranges of cuda:all write
        writer.write_at(100, frames[100:150])
        writer.write_at(0, frames[:37])
        writer.write_at(37, frames[37:100])
        writer.write_repeated(150, frames[150], len(frames) - 150)
        writer.check_complete()
        writer.set_ppid("rollmed:k=4^b=10")


@pytest.mark.parametrize("compression", ["zstd-5", "zstd-1", "none"])
def test_written_files_read_back_in_h5py_and_dclab(tmp_path, compression):
    expected = FRAMES.copy()
    expected[150:] = FRAMES[150]
    chunk_bytes = []
    for threads in (1, 2, 5):
        path = tmp_path / f"out{threads}.rtdc"
        write_frames(path, compression, threads, expected)
        with h5py.File(path) as h5:
            dataset = h5["events/image_bg"]
            assert np.array_equal(dataset[:], expected)  # HDF5 verifies every checksum
            assert dataset.fletcher32 and dataset.chunks == (1000, 12, 20)
            assert ("32015" in dataset._filters) == (compression != "none")
            chunk_bytes.append(dataset.id.read_direct_chunk((0, 0, 0))[1])
        with dclab.new_dataset(path) as ds:
            assert np.array_equal(ds["image_bg"][:], expected)
    assert len(set(chunk_bytes)) == 1, "the bytes do not depend on the number of threads"


def test_a_flipped_bit_in_a_written_chunk_is_a_clean_error(tmp_path):
    frames = synthetic_stack(3000, shape=(12, 20), seed=4)
    path = tmp_path / "out.rtdc"
    write_frames(path, "zstd-5", 2, frames)
    with h5py.File(path) as h5:
        info = h5["events/image_bg"].id.get_chunk_info(1)  # frames 1000 to 1999
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x10]))
    with h5py.File(path) as h5, concurrent.futures.ThreadPoolExecutor(2) as pool:
        source = ImageSource(h5["events/image_bg"], pool=pool)
        out = np.empty((3000, 240), np.uint8)
        source.read_into(0, 1000, out)
        with pytest.raises(errors.InputFileError,
                           match=r"out.rtdc cannot be read at frames 1000 to 1999 .*"
                                 r"Fletcher-32 checksum .*damaged"):
            source.read_into(900, 2100, out)
        with pytest.raises(OSError):  # HDF5's own check agrees
            h5["events/image_bg"][1500]


def test_writer_refuses_frames_outside_the_dataset_and_reports_missing_ones(tmp_path):
    with h5py.File(tmp_path / "w.h5", "w") as h5:
        writer = ImageBgWriter(h5.require_group("events"), (4, 5), 30)
        with pytest.raises(ValueError, match="lie outside image_bg"):
            writer.write_at(25, np.zeros((10, 20), np.uint8))
        writer.write_at(0, np.zeros((20, 20), np.uint8))
        with pytest.raises(RuntimeError, match="misses frames from 0 on"):
            writer.check_complete()


WIDE_LAYOUTS = {
    "zstd+shuffle+fletcher32": {"chunks": (16, 12, 20), "shuffle": True, "fletcher32": True,
                                **hdf5plugin.Zstd(clevel=5)},
    "deflate+shuffle": {"chunks": (9, 12, 20), "compression": "gzip", "shuffle": True},
    "big-endian (h5py reads it)": {"chunks": (16, 12, 20), "shuffle": True,
                                   **hdf5plugin.Zstd()},
}
"""Layouts of 16- and 8-bit frames for the array functions; shuffle's element size is
the item size"""


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int8])
@pytest.mark.parametrize("layout", sorted(WIDE_LAYOUTS))
def test_decoded_frames_of_other_dtypes_equal_h5pys(tmp_path, dtype, layout):
    """Frames of 2-byte items, values of the other byte order and the fill value of chunks
    never written read as h5py reads them"""
    info = np.iinfo(dtype)
    frames = np.random.default_rng(3).integers(info.min, info.max, (203, 12, 20), dtype=dtype,
                                               endpoint=True)
    stored_dtype = np.dtype(dtype).newbyteorder(">" if layout.startswith("big") else "=")
    fill = info.min + 5  # a value whose bytes differ, and of the value's sign
    with h5py.File(tmp_path / "frames.h5", "w") as h5, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        dataset = h5.create_dataset("frames", shape=frames.shape, dtype=stored_dtype,
                                    fillvalue=fill, **WIDE_LAYOUTS[layout])
        chunk = dataset.chunks[0]
        dataset[:chunk * 3] = frames[:chunk * 3]  # the rest of the chunks is never written
        dataset[chunk * 5:] = frames[chunk * 5:]
        expected = dataset[:]
        assert (expected[chunk * 3:chunk * 5] == fill).all()
        source = ImageSource(dataset, pool=pool, image_rules=False)
        assert (source.chunked is None) == (not stored_dtype.isnative)  # int8 has no order
        out = np.zeros((203, 12 * 20), dtype)
        for start, stop in [(0, 203), (3, 50), (chunk * 3 - 1, chunk * 5 + 1), (200, 203)]:
            source.read_into(start, stop, out)
            assert np.array_equal(out[:stop - start].reshape(-1, 12, 20), expected[start:stop])


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_chunks_of_2_byte_frames_written_by_dcbg_read_back_in_h5py(tmp_path, dtype):
    from dcbg.rtdc.writer import ChunkedStackWriter, stack_writer
    info = np.iinfo(dtype)
    frames = np.random.default_rng(4).integers(info.min, info.max, (70, 12, 20), dtype=dtype,
                                               endpoint=True)
    layout = WIDE_LAYOUTS["zstd+shuffle+fletcher32"]
    with h5py.File(tmp_path / "out.h5", "w") as h5, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        dataset = h5.create_dataset("out", shape=frames.shape, dtype=dtype, **layout)
        writer = stack_writer(dataset, pool)
        assert isinstance(writer, ChunkedStackWriter)
        writer.write_at(20, frames[20:37].reshape(17, -1))
        writer.write_at(0, frames[:20].reshape(20, -1))
        writer.write_repeated(37, frames[36], 33)  # part of a chunk, a whole one, the end
        writer.check_complete()
        reference = h5.create_dataset("reference", data=frames, **layout)
        reference[37:] = frames[36]
    with h5py.File(tmp_path / "out.h5") as h5:  # h5py checks every Fletcher-32 checksum
        assert np.array_equal(h5["out"][:], h5["reference"][:])
        assert [h5["out"].id.read_direct_chunk((row, 0, 0))[1] for row in range(0, 70, 16)] \
            == [h5["reference"].id.read_direct_chunk((row, 0, 0))[1]
                for row in range(0, 70, 16)]
