import hashlib
import json
import pathlib

import h5py
import numpy as np
import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """The instrument files and golden outputs beside the checkout"""
    if not (SHARED_DATA / "golden" / "index.json").exists():
        pytest.skip("../shared/data is not present (a user's clone has none)")
    return SHARED_DATA


def dataset_digests(path) -> dict:
    """Digest of every dataset and attribute in a file, by name"""
    digests = {}
    with h5py.File(path) as h5:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                raw = (repr(data.tolist()).encode() if data.dtype == object
                       else np.ascontiguousarray(data).tobytes())
                digests[name] = hashlib.sha256(raw).hexdigest()
            digests[name + "@attrs"] = sorted((k, str(v)) for k, v in obj.attrs.items())
        h5.visititems(visit)
        digests["@root"] = sorted((k, str(v)) for k, v in h5.attrs.items())
    return digests


def golden_entries():
    index = SHARED_DATA / "golden" / "index.json"
    return json.loads(index.read_text()) if index.exists() else []


def stack_cases():
    """Named uint8 stacks covering the edge cases of SPEC section 2"""
    rng = np.random.default_rng(20261122)
    from dcbg.synthetic import synthetic_stack
    cases = {
        "random": rng.integers(0, 256, (63, 5, 7), dtype=np.uint8),
        "constant": np.full((40, 3, 4), 77, np.uint8),
        "alternating_0_255": (np.indices((51, 4, 6)).sum(axis=0) % 2 * 255).astype(np.uint8),
        "two_level": np.where(rng.random((45, 6, 5)) < 0.5, 12, 200).astype(np.uint8),
        "extremes": rng.choice(np.array([0, 255], np.uint8), (39, 2, 9)),
        "ramp": (np.arange(70)[:, None, None] * 3 + np.arange(8)[None, None, :]
                 + np.zeros((70, 2, 8), int)).astype(np.uint8),
        "realistic": synthetic_stack(80, shape=(12, 40), seed=7),
        "single_pixel": rng.integers(0, 256, (33, 1, 1), dtype=np.uint8),
    }
    return cases


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory):
    """rollmed.cu compiled for the CPU with the host shim"""
    import host_kernel as hk
    lib = hk.build(tmp_path_factory.mktemp("kernel"))
    if lib is None:
        pytest.skip("no C++ compiler to build the kernel's host shim")
    return lib
