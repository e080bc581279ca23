import pickle

import pytest

import dcbg
from dcbg import ppid
from dcbg.errors import UnknownKeywordError


def example_method(*, kernel_size: int = 100, keep_going: bool = False,
                   kappa: float = 2.5, label: str = "x"):
    """A method whose keywords share prefixes, to exercise abbreviations"""


def test_unique_prefixes_like_dcnum():
    assert ppid.unique_prefixes(["kernel_size", "batch_size"]) == ["k", "b"]
    assert ppid.unique_prefixes(["kernel_size", "keep_going", "kappa", "label"]) == [
        "ker", "kee", "ka", "l"]
    # a name that is a prefix of another stays whole, the other gets one more letter
    assert ppid.unique_prefixes(["thresh", "threshold"]) == ["thresh", "thresho"]


@pytest.mark.parametrize("text,kwargs", [
    ("rollmed:k=100^b=10000", {"kernel_size": 100, "batch_size": 10000}),
    ("rollmed:k=10^b=20", {"kernel_size": 10, "batch_size": 20}),
    ("rollmed:kernel_size=8^batch_size=30", {"kernel_size": 8, "batch_size": 30}),
    ("rollmed:b=500", {"kernel_size": 100, "batch_size": 500}),
    ("rollmed:", {"kernel_size": 100, "batch_size": 10000}),
])
def test_decode_dcnum_strings(text, kwargs):
    assert dcbg.Background.get_ppkw_from_ppid(text) == kwargs


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 100, "batch_size": 10000},
    {"kernel_size": 2, "batch_size": 3},
    {"kernel_size": 1000, "batch_size": 123457},
])
def test_round_trip(kwargs):
    text = dcbg.BackgroundRollMed.get_ppid_from_ppkw(kwargs)
    assert text == f"rollmed:k={kwargs['kernel_size']}^b={kwargs['batch_size']}"
    assert dcbg.Background.get_ppkw_from_ppid(text) == kwargs


def test_value_formatting_and_parsing():
    text = ppid.kwargs_to_ppid(example_method, {"keep_going": True, "kappa": 3.0})
    assert text == "ker=100^kee=1^ka=3^l=x"
    decoded = ppid.ppid_to_kwargs(example_method, text)
    assert decoded == {"kernel_size": 100, "keep_going": True, "kappa": 3.0, "label": "x"}
    assert isinstance(decoded["kappa"], float)
    assert ppid.ppid_to_kwargs(example_method, "ka=2.25^kee=0")["kappa"] == 2.25


def test_get_ppid_of_instance(tmp_path):
    import numpy as np
    stack = np.zeros((12, 2, 2), np.uint8)
    with dcbg.BackgroundRollMed(stack, tmp_path / "o.rtdc", kernel_size=4, batch_size=6,
                                device="cpu") as bg:
        assert bg.get_ppid() == "rollmed:k=4^b=6"
        assert bg.get_ppid_code() == "rollmed"
        assert bg.kwargs == {"kernel_size": 4, "batch_size": 6}


@pytest.mark.parametrize("text,message", [
    ("sparsemed:k=100", "Unknown background method 'sparsemed'"),
    ("rollmed:z=3", "Unknown PPID keyword 'z'"),
    ("rollmed:k=abc", "not a valid int"),
    ("rollmed:k=2.5", "not a valid int"),
    ("rollmed:k100", "not of the form key=value"),
    ("k=100^b=10", "has no method code"),
])
def test_decode_errors(text, message):
    with pytest.raises(ValueError, match=message):
        dcbg.Background.get_ppkw_from_ppid(text)


def test_an_unknown_keyword_carries_what_it_concerns_across_processes():
    with pytest.raises(UnknownKeywordError) as caught:
        ppid.ppid_to_kwargs(dcbg.BackgroundRollMed.check_user_kwargs, "kernal_size=10")
    for error in (caught.value, pickle.loads(pickle.dumps(caught.value))):  # as Dask sends it
        assert (error.keyword, error.known) == ("kernal_size", ("kernel_size", "batch_size"))
        assert str(error) == ("Unknown PPID keyword 'kernal_size'; the keywords are "
                              "k (kernel_size) and b (batch_size).")


def test_available_methods():
    assert dcbg.get_available_background_methods() == {"rollmed": dcbg.BackgroundRollMed}


def test_base_class_has_no_code():
    with pytest.raises(ValueError, match="no PPID code"):
        dcbg.Background.get_ppid_code()
