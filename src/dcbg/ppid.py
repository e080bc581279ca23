"""Pipeline identifiers (PPIDs) compatible with dcnum

A PPID names a background method and its keyword arguments in one string,
``KEY:kw=val^kw=val``, for example ``rollmed:k=100^b=10000``. Keyword names
are abbreviated to their shortest prefix that is unique among the method's
keywords, booleans are written as 0/1 and integral floats without ".0",
exactly as dcnum writes them, so that dcnum and dcbg read each other's PPIDs.
"""
from __future__ import annotations

import inspect
import typing

from .errors import UnknownKeywordError


def unique_prefixes(names: list[str]) -> list[str]:
    """Return the shortest prefix of every name that no other name shares

    A name that is itself a prefix of another name is kept whole.

    Parameters
    ----------
    names: list of str
        Distinct keyword names.

    Returns
    -------
    prefixes: list of str
        One abbreviation per name, in the same order.
    """
    prefixes = []
    for name in names:
        length = 1
        for other in names:
            if other == name:
                continue
            common = 0
            for a, b in zip(name, other, strict=False):
                if a != b:
                    break
                common += 1
            length = max(length, common + 1)
        prefixes.append(name[:min(length, len(name))])
    return prefixes


def keyword_defaults(method: typing.Callable) -> dict[str, typing.Any]:
    """Keyword-only arguments of `method` and their defaults, in order"""
    return dict(inspect.getfullargspec(method).kwonlydefaults or {})


def keyword_types(method: typing.Callable) -> dict[str, type]:
    """Types of the keyword-only arguments of `method`

    Annotations are resolved to types; a keyword without a usable
    annotation takes the type of its default value.
    """
    defaults = keyword_defaults(method)
    hints = typing.get_type_hints(method)
    return {kw: hints.get(kw, type(value)) for kw, value in defaults.items()}


def format_value(value: typing.Any) -> str:
    """Format one keyword value the way dcnum writes it into a PPID"""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return str(int(value))
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        if float(value).is_integer():
            return str(int(value))
    return str(value)


def parse_value(text: str, kind: type, key: str) -> typing.Any:
    """Convert the text of one PPID value to the keyword's type"""
    try:
        if kind is bool:
            if text.lower() in ("true", "yes"):
                return True
            if text.lower() in ("false", "no"):
                return False
            return bool(float(text))
        if kind is int:
            return parse_int(text)
        return kind(text)
    except ValueError:
        raise ValueError(
            f"PPID value '{text}' for '{key}' is not a valid {kind.__name__}; "
            f"write it as a plain {kind.__name__}.") from None


def parse_int(text: str) -> int:
    """An integer written plainly ("10000") or as an integral float ("1e4", "100.0")

    Plain integers are read exactly, however long; floats only where they
    are exact, so that a value never changes on its way into a PPID.
    """
    try:
        return int(text)
    except ValueError:
        pass
    number = float(text)
    if not number.is_integer() or abs(number) > 2**53:
        raise ValueError(text)
    return int(number)


def kwargs_to_ppid(method: typing.Callable, kwargs: dict) -> str:
    """Encode keyword arguments of `method` as the keyword part of a PPID

    Every keyword-only argument of `method` appears, in signature order,
    with its value from `kwargs` or its default.
    """
    defaults = keyword_defaults(method)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise ValueError(
            f"Unknown keyword argument(s) {sorted(unknown)}; valid ones are "
            f"{list(defaults)}.")
    names = list(defaults)
    parts = []
    for name, abbreviation in zip(names, unique_prefixes(names), strict=True):
        parts.append(f"{abbreviation}={format_value(kwargs.get(name, defaults[name]))}")
    return "^".join(parts)


def ppid_to_kwargs(method: typing.Callable, ppid_kwargs: str) -> dict:
    """Decode the keyword part of a PPID into the full keyword arguments

    Keys may be abbreviated (any unique prefix) or written in full; keywords
    that the PPID does not mention take their defaults.
    """
    defaults = keyword_defaults(method)
    kinds = keyword_types(method)
    kwargs = dict(defaults)
    if not ppid_kwargs.strip():
        return kwargs
    entries = []
    for item in ppid_kwargs.split("^"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"PPID entry '{item}' is not of the form key=value; "
                f"separate entries with '^', e.g. 'k=100^b=10000'.")
        entries.append((key.strip(), value.strip()))
    given: dict[str, str] = {}
    for key, value in entries:
        name = resolve_keyword(key, list(defaults))
        if name in given:
            raise ValueError(
                f"Keyword '{name}' is given twice ('{given[name]}' and '{key}={value}'); "
                f"give each keyword once.")
        given[name] = f"{key}={value}"
        kwargs[name] = parse_value(value, kinds[name], name)
    return kwargs


def resolve_keyword(key: str, names: list[str]) -> str:
    """The keyword a PPID key stands for: its full name, or the one name it abbreviates

    Raises
    ------
    UnknownKeywordError
        If `key` is no keyword and no prefix of exactly one.
    """
    if key in names:
        return key
    matches = [name for name in names if name.startswith(key)]
    if len(matches) != 1:
        keywords = [f"{short} ({name})" if short != name else name
                    for short, name in zip(unique_prefixes(names), names, strict=True)]
        listed = ", ".join(keywords[:-1]) + " and " + keywords[-1] if len(keywords) > 1 \
            else "".join(keywords) or "none"
        raise UnknownKeywordError(
            f"Unknown PPID keyword '{key}'; the keywords are {listed}.", key, names)
    return matches[0]


def split_ppid(ppid: str) -> tuple[str, str]:
    """Split a PPID into its method code and its keyword part"""
    code, sep, rest = ppid.partition(":")
    if not sep or not code:
        raise ValueError(
            f"PPID '{ppid}' has no method code; write it as 'method:kw=val', "
            f"e.g. 'rollmed:k=100^b=10000'.")
    return code.strip(), rest
