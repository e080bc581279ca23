"""The CPU engine against the normative definition, byte for byte, and its workers"""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

import dcbg
from dcbg.engines import cpu
from dcbg.engines.cpu import compute_median_for_slice, job_slices
from dcbg.errors import WorkerFailure
from dcbg.reference import rolling_median_reference, rolling_median_windows_reference
from dcbg.synthetic import synthetic_stack
from helpers.data import stack_cases
from helpers.processes import alive
from helpers.threads import finishes

CASES = stack_cases()


def slice_medians(stack, kernel_size, slices):
    frames = stack.reshape(len(stack), -1)
    count = max(len(stack) - kernel_size, 1)
    out = np.full((count, frames.shape[1]), 0xAB, np.uint8)  # poisoned
    for job in slices:
        compute_median_for_slice(frames, out, kernel_size, count, job)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kernel_size", [2, 4, 10, 30])
def test_slice_kernel_matches_definition(cpu_build, name, kernel_size):
    stack = CASES[name]
    expected = rolling_median_reference(stack, kernel_size)
    pixels = stack[0].size
    for workers in (1, 2, 3):
        got = slice_medians(stack, kernel_size, job_slices(pixels, workers))
        assert np.array_equal(got, expected[:len(got)].reshape(len(got), -1))


@pytest.mark.parametrize("kernel_size", [254, 256, 300, 1000])
@pytest.mark.parametrize("extra", [0, 1, 37])
def test_slice_kernel_large_kernels(cpu_build, kernel_size, extra):
    rng = np.random.default_rng(kernel_size + extra)
    stack = rng.integers(0, 256, (kernel_size + extra, 3, 3), dtype=np.uint8)
    stack[:, 0, 0] = 255  # counts beyond 255 in one bin
    stack[:, 1, 1] = np.where(np.arange(len(stack)) % 2, 0, 255)
    expected = rolling_median_reference(stack, kernel_size)
    got = slice_medians(stack, kernel_size, [slice(0, 9)])
    assert np.array_equal(got, expected[:len(got)].reshape(len(got), -1))


def run_background(stack, tmp_path, **kwargs):
    out = tmp_path / "bg.rtdc"
    out.unlink(missing_ok=True)
    with dcbg.BackgroundRollMed(stack, out, device="cpu", **kwargs) as bg:
        bg.process()
        assert bg.get_progress() == 1
    with h5py.File(out) as h5:
        return h5["events/image_bg"][:]


@pytest.mark.parametrize("shape,count,kernel_size,batch_size,num_cpus", [
    ((1, 1), 20, 2, 3, 1),            # tiniest frame, many batches
    ((5, 7), 10, 10, 11, 2),          # N == k
    ((5, 7), 11, 10, 11, 2),          # N == k + 1
    ((9, 4), 101, 8, 13, 2),          # N not a multiple of the batch size
    ((9, 4), 50, 8, 1000, 1),         # batch larger than N
    ((80, 400), 23, 4, 7, 2),         # instrument frame size
    ((3, 5), 300, 256, 257, 2),       # k > 255
    ((4, 5), 2600, 10, 10000, 2),     # engine batches shorter than batch_size
])
def test_pipeline_matches_definition(tmp_path, shape, count, kernel_size, batch_size, num_cpus):
    rng = np.random.default_rng(count * kernel_size)
    stack = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    got = run_background(stack, tmp_path, kernel_size=kernel_size, batch_size=batch_size,
                         num_cpus=num_cpus)
    assert np.array_equal(got, rolling_median_reference(stack, kernel_size))


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_result_independent_of_batch_size_and_workers(tmp_path, monkeypatch, workers):
    if workers == "processes":
        monkeypatch.setattr(cpu, "PROCESS_MIN_WINDOWS", 0)
    stack = CASES["realistic"]
    expected = rolling_median_reference(stack, 10)
    for batch_size, num_cpus in [(11, 1), (17, 2), (69, 2), (500, 1)]:
        got = run_background(stack, tmp_path, kernel_size=10, batch_size=batch_size,
                             num_cpus=num_cpus)
        assert np.array_equal(got, expected), (batch_size, num_cpus)


def test_h5py_dataset_input_is_read_in_batches(tmp_path):
    stack = CASES["realistic"]
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["frames"] = stack
    with h5py.File(tmp_path / "in.h5") as h5:
        got = run_background(h5["frames"], tmp_path, kernel_size=6, batch_size=20)
    assert np.array_equal(got, rolling_median_reference(stack, 6))


@pytest.mark.parametrize("kwargs,message", [
    ({"kernel_size": 3}, "positive even integer"),
    ({"kernel_size": 0}, "positive even integer"),
    ({"kernel_size": -2}, "positive even integer"),
    ({"kernel_size": 10.0}, "must be an integer"),
    ({"kernel_size": 10, "batch_size": 10}, "larger than kernel_size"),
    ({"kernel_size": 100}, "N=20 events.*kernel_size=100"),
    ({"num_cpus": 0}, "num_cpus must be a positive integer"),
])
def test_invalid_arguments(tmp_path, kwargs, message):
    stack = np.zeros((20, 2, 2), np.uint8)
    with pytest.raises(ValueError, match=message):
        dcbg.BackgroundRollMed(stack, tmp_path / "o.rtdc", device="cpu", **kwargs)
    assert not list(tmp_path.iterdir()), "a failed check must not create files"


def test_empty_and_non_uint8_input(tmp_path):
    with pytest.raises(ValueError, match="N=0 events"):
        dcbg.BackgroundRollMed(np.zeros((0, 4, 4), np.uint8), tmp_path / "o.rtdc", device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        dcbg.BackgroundRollMed(np.zeros((20, 4, 4), np.float32), tmp_path / "o.rtdc",
                               device="cpu")


def test_batches_overlap_for_short_inputs_and_stay_bounded():
    plan = cpu.CPURollingMedian.plan_batch
    assert plan(10000, 100, 1400) == 400  # four kernel sizes at least
    assert plan(10000, 10, 1400) == 350  # four batches for a short input
    assert plan(10000, 10, 10**6) == cpu.PIPELINE_BATCH
    assert plan(20, 10, 10**6) == 20  # never more than asked for
    assert plan(10000, 1000, 10**6) == 4000


def test_batches_of_large_frames_stay_within_the_memory_budget():
    """Buffers of 256x256 uint16 frames: fewer windows, but never fewer than kernel_size"""
    plan = cpu.CPURollingMedian.plan_batch
    frame = 256 * 256 * 2
    assert plan(10000, 100, 10**6, frame_bytes=80 * 320, buffers=3) == cpu.PIPELINE_BATCH
    assert plan(10000, 1000, 10**6, frame_bytes=80 * 320, buffers=3) == 4000  # as before
    for buffers, scratch in ((2, 0), (3, 0), (2, 200 << 20)):
        windows = plan(10000, 100, 10**6, frame, buffers, scratch)
        assert windows < cpu.PIPELINE_BATCH
        memory = buffers * (2 * windows + 99) * frame + scratch
        assert memory <= cpu.BATCH_MEMORY_BYTES < memory + 2 * buffers * frame
    assert plan(10000, 3000, 10**6, frame) == 3000  # a window of frames needs more
    assert plan(10, 3000, 10, frame) == 10  # still no more than asked for


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_each_thread_keeps_its_scratch_for_every_job_and_batch(monkeypatch, dtype):
    """At large k the 16-bit kernel's scratch is k * 2 bytes per column: allocated once"""
    from dcbg import cpukernels
    allocated = []
    scratch = cpukernels.scratch
    monkeypatch.setattr(cpukernels, "scratch",
                        lambda *args: allocated.append(args) or scratch(*args))
    monkeypatch.setattr(cpu, "PIXELS_PER_JOB", 300)
    stack = np.random.default_rng(1).integers(0, 200, (949, 40, 60)).astype(dtype)
    frames = stack.reshape(949, -1)
    engine = cpu.CPURollingMedian((40, 60), 50, 10000, 2, 900, dtype)
    medians = np.zeros((900, 40 * 60), dtype)

    def read_into(start, stop, out):
        out[:stop - start] = frames[start:stop]

    def write_at(offset, rows):
        medians[offset:offset + len(rows)] = rows

    with engine:
        engine.run(read_into, 0, 900, write_at)
    jobs = len(engine.workers.jobs) * -(-900 // engine.batch_windows)
    assert jobs >= 24 and engine.num_cpus <= 2
    # one for the check of the type, one per thread (and the warm-up's own)
    assert len(allocated) <= 2 + engine.num_cpus
    expected = rolling_median_windows_reference(stack, 50)
    assert np.array_equal(medians, expected.reshape(900, -1))


def test_workers_are_as_decided_but_capped_by_pixels(caplog):
    """The CPUs cap the workers when the settings are decided; the engine takes the
    number decided and caps it only by the pixel slices its frames make"""
    jobs = 80 * 320 // cpu.MIN_PIXELS_PER_JOB
    assert cpu.CPURollingMedian((80, 320), 10, 100, 1000, 500).num_cpus == jobs
    assert cpu.CPURollingMedian((80, 320), 10, 100, 3, 500).num_cpus == 3
    assert caplog.text == "", "the engine warns about nothing: the settings did"
    engine = cpu.CPURollingMedian((80, 320), 10, 100, 1000, 500)
    assert cpu.CPURollingMedian((4, 5), 10, 100, 2, 500).num_cpus == 1
    assert isinstance(engine.workers, cpu.ThreadWorkers)
    assert isinstance(cpu.CPURollingMedian((4, 5), 10, 100, 1, cpu.PROCESS_MIN_WINDOWS).workers,
                      cpu.ProcessWorkers)


def test_worker_processes_compute_on_the_batch_buffers_where_they_lie():
    """The reader fills a shared buffer and the writer reads one: no batch is copied"""
    stack = synthetic_stack(80, shape=(40, 60), seed=2)
    expected = rolling_median_windows_reference(stack, 10).reshape(71, -1)
    workers = cpu.ProcessWorkers(40 * 60, 10, 60, 2)
    workers.start()
    try:
        inputs, outputs = workers.buffers(69, 60)
        assert all(np.shares_memory(view, shared) for view, shared in
                   zip(inputs + outputs, workers.shared_input + workers.shared_output,
                       strict=True))
        inputs[1][:] = stack[:69].reshape(69, -1)
        workers.compute(inputs[1], outputs[1], 60)
        assert np.array_equal(outputs[1], expected[:60])
        assert not workers.shared_input[0].any() and not workers.shared_output[0].any()
    finally:
        workers.close()


def test_dead_worker_fails_fast():
    stack = synthetic_stack(600, shape=(40, 60), seed=1).reshape(600, -1)
    workers = cpu.ProcessWorkers(40 * 60, 100, 500, 2)
    workers.start()
    try:
        (frames, _), (medians, _) = workers.buffers(599, 500)
        frames[:] = stack[:599]
        workers.compute(frames, medians, 500)
        while not all(workers.started):  # both are ready: a death now is mid-work
            time.sleep(0.01)
        for worker in workers.workers:
            os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerFailure, match="died with exit code"):
            workers.compute(frames, medians, 500)
    finally:
        workers.close()


def test_more_jobs_than_the_queue_holds_are_exact_and_dead_workers_still_noticed(monkeypatch):
    """A batch of 2400 one-pixel jobs: their queue's pipe holds about 1,000"""
    monkeypatch.setattr(cpu, "PIXELS_PER_JOB", 1)
    stack = synthetic_stack(60, shape=(40, 60), seed=1)
    expected = rolling_median_reference(stack, 10).reshape(60, -1)
    workers = cpu.ProcessWorkers(40 * 60, 10, 50, 2)
    workers.start()
    try:
        (frames, _), (medians, _) = workers.buffers(59, 50)
        frames[:] = stack[:59].reshape(59, -1)
        finishes(lambda: workers.compute(frames, medians, 50), seconds=120)
        assert np.array_equal(medians, expected[:50])
        for worker in workers.workers:
            os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerFailure, match="died with exit code"):
            finishes(lambda: workers.compute(frames, medians, 50))
    finally:
        workers.close()


def test_close_ends_workers_that_ignore_the_request_to_stop():
    workers = cpu.ProcessWorkers(40 * 60, 10, 50, 2)
    workers.start()
    while not all(workers.started):
        time.sleep(0.01)
    pids = [worker.pid for worker in workers.workers]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # deaf to everything but SIGKILL
    finishes(workers.close)
    assert not any(alive(pid) for pid in pids)
    assert multiprocessing.active_children() == []


def test_worker_that_dies_while_starting_names_the_main_guard(tmp_path):
    """A script without the main guard makes every spawned worker run it again"""
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        import dcbg
        from dcbg.engines import cpu
        cpu.PROCESS_MIN_WINDOWS = 0
        stack = np.zeros((60, 4, 4), np.uint8)
        with dcbg.BackgroundRollMed(stack, {str(tmp_path / "out.rtdc")!r}, kernel_size=4,
                                    num_cpus=1, device="cpu") as bg:
            bg.process()
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "exited with code 1 while starting" in last, run.stderr[-2000:]
    assert "if __name__ == \"__main__\":" in last
    assert "out of memory" not in last


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_the_engine_computes_uint16_frames_in_buffers_of_their_dtype(monkeypatch, workers):
    """The frames' bytes fill the buffers (and the worker processes' RawArrays) as 16-bit
    values, and the medians come back as such"""
    from dcbg.reference import rolling_median_windows_reference
    from dcbg.synthetic import synthetic_stack16
    if workers == "processes":
        monkeypatch.setattr(cpu, "PROCESS_MIN_WINDOWS", 0)
    stack = synthetic_stack16(90, (9, 40), seed=3)
    stack[::7, 0, :5] = 65535
    frames = stack.reshape(len(stack), -1)
    kernel_size, windows = 11, 80
    medians = np.zeros((windows, frames.shape[1]), np.uint16)

    def read_into(start, stop, out):
        assert out.dtype == np.uint16
        out[:stop - start] = frames[start:stop]

    def write_at(offset, rows):
        medians[offset:offset + len(rows)] = rows

    with cpu.CPURollingMedian((9, 40), kernel_size, 23, 2, windows, np.uint16) as engine:
        assert engine.workers.kind == workers
        last = engine.run(read_into, 0, windows, write_at)
    expected = rolling_median_windows_reference(stack, kernel_size).reshape(windows, -1)
    assert np.array_equal(medians, expected) and np.array_equal(last, expected[-1])
