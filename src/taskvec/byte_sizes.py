"""Byte sizes as people write them on a command line: `8GiB`, `500MB`, `2.5G`, `1073741824`.

Units follow GNU coreutils (`sort -S`, `dd`): the IEC units (KiB, MiB, GiB, TiB) and the bare
letters (K, M, G, T) are powers of 1024, and the SI units (kB, MB, GB, TB) powers of 1000. Letters
are read in any case, since nobody means kilobits in a memory budget; a space may separate the
number from its unit. Depends on nothing else in taskvec.
"""

from __future__ import annotations

import argparse
import re
from fractions import Fraction

# Keys are lower case: units are matched in any case.
UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    **{letter: 1024**power for power, letter in enumerate("kmgt", start=1)},
    **{letter + "ib": 1024**power for power, letter in enumerate("kmgt", start=1)},
    **{letter + "b": 1000**power for power, letter in enumerate("kmgt", start=1)},
}

_PATTERN = re.compile(r"\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)\s*", re.IGNORECASE)

_EXAMPLES = "e.g. 8GiB, 500MB, 2.5G or 1073741824"


def parse_byte_size(text: str) -> int:
    """The number of bytes `text` names; ValueError with the accepted forms for anything else.

    A fraction is allowed when it comes to whole bytes (`2.5G`, `1.5kB`), since a budget of part of
    a byte would be a typo rather than a request.
    """
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a size in bytes ({_EXAMPLES}), got {text!r}")
    unit = match["unit"].lower()
    if unit not in UNITS:
        known = "B, K, M, G, T, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise ValueError(f"unknown unit {match['unit']!r} in {text!r}; use one of {known} ({_EXAMPLES})")
    # A Fraction, not a float or a Decimal (28 digits): exact for any number the pattern admits.
    exact = Fraction(match["number"]) * UNITS[unit]
    if exact.denominator != 1:
        raise ValueError(f"{text!r} is {float(exact):g} bytes, not a whole number of bytes")
    return exact.numerator


def format_byte_size(size: int) -> str:
    """`size` in the largest unit that names it exactly (`8GiB`, `500MB`), else in plain bytes.

    Exact so that `parse_byte_size(format_byte_size(n)) == n`: a configuration written back to a
    command line must give the same number.
    """
    if size < 0:
        raise ValueError(f"a byte size is not negative, got {size}")
    candidates = [(2**40, "TiB"), (10**12, "TB"), (2**30, "GiB"), (10**9, "GB"), (2**20, "MiB")]
    candidates += [(10**6, "MB"), (2**10, "KiB"), (10**3, "kB")]
    for factor, name in candidates:
        if size and size % factor == 0:
            return f"{size // factor}{name}"
    return str(size)


def byte_size_argument(text: str) -> int:
    """`parse_byte_size` as an argparse `type=` for a budget: at least one byte, and a bad value reads
    "argument --x: expected a size in bytes ..." rather than argparse's "invalid value"."""
    try:
        size = parse_byte_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return size
