"""Fuzz dcbg's .rtdc reader with mutated small files

``python fuzz_reader.py FOLDER --count N --seed S`` writes two small valid
recordings (images in the file; images reached through a file basin),
then N mutated copies: random bit flips, a zeroed 512-byte block, or a
truncation (the same copies for a seed, however many ``--jobs`` read
them). Each copy is opened as dcbg opens an input, its metadata is
copied and every frame is read. A copy that reads is "readable"; one that
fails must fail with one of dcbg's input errors whose message names the
file. Anything else is "unclean". Each input is read in a child process;
one that takes longer than ``--timeout`` counts as a "hang", one that kills
the child as a "crash" (both are failures of libhdf5 itself on damaged
attributes); such inputs are kept in FOLDER/fuzz_findings. The
last stdout line is a JSON report.
"""
import argparse
import json
import multiprocessing as mp
import pathlib
import queue
import sys
import threading

import h5py
import numpy as np

import dcbg
from dcbg import errors
from dcbg.rtdc.basins import write_output_basins
from dcbg.rtdc.metadata_check import probe_metadata
from dcbg.rtdc.reader import RTDCInput
from dcbg.rtdc.writer import copy_metadata
from dcbg.synthetic import write_synthetic_rtdc

CLEAN = (errors.InputDataError, errors.InputFileError, FileNotFoundError)


def base_files(folder: pathlib.Path) -> list[pathlib.Path]:
    direct = write_synthetic_rtdc(folder / "direct.rtdc", 90, shape=(8, 12), seed=1,
                                  events_per_chunk=16)
    raw = write_synthetic_rtdc(folder / "raw.rtdc", 60, shape=(6, 10), seed=2)
    basin_only = folder / "basin_only.rtdc"
    with RTDCInput(raw) as source, h5py.File(basin_only, "w") as h5:
        copy_metadata(source.h5, h5)
        write_output_basins(h5, source.h5, source.path, basin_only)
    return [direct, basin_only]


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = rng.choice(["flip", "zero", "truncate"], p=[0.6, 0.2, 0.2])
    buffer = bytearray(data)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 20))):
            buffer[int(rng.integers(len(buffer)))] ^= 1 << int(rng.integers(8))
    elif kind == "zero":
        start = int(rng.integers(len(buffer)))
        buffer[start:start + 512] = bytes(len(buffer[start:start + 512]))
    else:
        buffer = buffer[:int(rng.integers(len(buffer)))]
    return bytes(buffer), str(kind)


def read_like_dcbg(path: pathlib.Path, out: pathlib.Path, probe_seconds: float):
    """Open an input as ``dcbg compute`` does, copy its metadata, read every frame"""
    probe_metadata(path, probe_seconds)
    with dcbg.BackgroundRollMed(path, out, kernel_size=4, batch_size=16, num_cpus=1,
                                io_threads=2, device="cpu") as bg:
        with h5py.File("metadata", "w", driver="core", backing_store=False) as scratch:
            copy_metadata(bg.h5in, scratch)
        frames = np.empty((16, bg.source.pixels), np.uint8)
        for start in range(0, bg.image_count, 16):
            stop = min(start + 16, bg.image_count)
            bg.source.read_into(start, stop, frames)


def classify(path: pathlib.Path, probe_seconds: float) -> list:
    """Read one mutant; return ["readable"], ["clean", …] or ["unclean", type, message]"""
    try:
        read_like_dcbg(path, path.with_name("unused_output.rtdc"), probe_seconds)
        return ["readable"]
    except CLEAN as error:
        if path.name in str(error) or "N=" in str(error):
            return ["clean", type(error).__name__]
        return ["unclean", type(error).__name__, str(error)[:300]]
    except Exception as error:  # noqa: BLE001 - this is what the fuzzer looks for
        return ["unclean", type(error).__name__, str(error)[:300]]


def reader_loop(conn, probe_seconds):
    """Child process: classify the mutants whose paths arrive on `conn`"""
    import logging
    logging.disable(logging.WARNING)  # damaged basin definitions are logged, expected here
    while True:
        path = conn.recv()
        if path is None:
            return
        conn.send(classify(pathlib.Path(path), probe_seconds))


class Reader:
    """The reader in a child process, so a hang or crash inside HDF5 is observed"""

    def __init__(self, probe_seconds):
        self.conn, child = mp.Pipe()
        self.process = mp.get_context("spawn").Process(target=reader_loop,
                                                        args=(child, probe_seconds),
                                                        daemon=True)
        self.process.start()

    def classify(self, path: pathlib.Path, timeout: float) -> list:
        self.conn.send(str(path))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        else:
            self.process.kill()
            self.process.join()
            return ["hang"]
        self.process.join()
        return ["crash", self.process.exitcode]

    def close(self):
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(5)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=pathlib.Path)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds after which one input counts as a hang (the metadata "
                        "probe gets half of it)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="reader child processes working at once")
    args = parser.parse_args()
    folder = args.folder / "fuzz"
    kept = args.folder / "fuzz_findings"
    folder.mkdir(parents=True, exist_ok=True)
    bases = base_files(folder)
    originals = [p.read_bytes() for p in bases]
    rng = np.random.default_rng(args.seed)
    report = {"tried": 0, "readable": 0, "clean_errors": 0, "kinds": {}, "unclean": [],
              "hangs": [], "crashes": []}
    mutants = []
    for i in range(args.count):
        which = int(rng.integers(len(bases)))
        data, kind = mutate(originals[which], rng)
        path = folder / f"mutant_{i}_{bases[which].name}"
        path.write_bytes(data)
        mutants.append((i, kind, path))
    todo = queue.SimpleQueue()
    for mutant in mutants:
        todo.put(mutant)
    outcomes = {}

    def classify_some():
        """One reader child per thread; a hang or crash costs that child only"""
        reader = Reader(args.timeout / 2)
        while True:
            try:
                i, kind, path = todo.get_nowait()
            except queue.Empty:
                break
            outcomes[i] = reader.classify(path, args.timeout)
            if outcomes[i][0] in ("hang", "crash"):
                reader = Reader(args.timeout / 2)
        reader.close()

    threads = [threading.Thread(target=classify_some) for _ in range(args.jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, kind, path in mutants:
        outcome = outcomes[i]
        report["tried"] += 1
        report["kinds"][kind] = report["kinds"].get(kind, 0) + 1
        if outcome[0] == "readable":
            report["readable"] += 1
        elif outcome[0] == "clean":
            report["clean_errors"] += 1
        else:
            report[{"unclean": "unclean", "hang": "hangs", "crash": "crashes"}[outcome[0]]
                   ].append([i, kind, *outcome[1:]])
            kept.mkdir(exist_ok=True)
            path.replace(kept / path.name)  # kept to reproduce
        path.unlink(missing_ok=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
