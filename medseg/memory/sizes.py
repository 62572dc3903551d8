"""Memory sizes as people write them ("24GiB", "80GB", "512M") read into bytes."""

from __future__ import annotations

import re

from medseg.errors import ConfigError

__all__ = ["GiB", "parse_size"]

GiB = 2**30


def parse_size(text: str) -> int:
    """Bytes in a memory size: "24GiB", "24GB", "24g", "8000MiB", "1.5 TiB", "512M", "4096B".

    Units are binary whatever their spelling (K, M, G, T with or without "i" and "B", any case):
    GPU memory is sized in powers of two, and an "80GB" card holds 80 GiB. A unit is required
    ("B" for bytes): a bare "24" is more likely meant as GiB than as bytes. Raises ConfigError.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])i?b?|b)\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise ConfigError(f"memory size {text!r}: expected a number and a unit, such as 24GiB, 24GB, 24g or 8000MiB")
    number, prefix = float(match.group(1)), (match.group(2) or "").lower()
    value = int(number * 1024 ** " kmgt".index(prefix or " "))
    if value <= 0:
        raise ConfigError(f"memory size {text!r}: must be more than zero bytes")
    return value

