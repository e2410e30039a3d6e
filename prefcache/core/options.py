"""prefcache.core.options."""

from __future__ import annotations

import math
import re


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _positive(name: str, value) -> None:
    # `nan <= 0` is False: without the isfinite check NaN (and inf) would pass as "positive"
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")


def _in_range(name: str, value, low: float, high: float | None = None, *, high_open: bool = False) -> None:
    """A finite number in [low, high] ([low, high) with high_open; no upper bound with high None)."""
    ok = value is not None and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        upper = "" if high is None else f", {high}{')' if high_open else ']'}"
        span = f"[{low}{upper}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {'in ' if high is not None else ''}{span}, got {value}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """Refuse a device name torch would reject only after the model loaded (e.g. 'tpu9', 'gpu')."""
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def _names(value) -> tuple:
    """'a,b' or ['a', 'b'] -> ('a', 'b')."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() if isinstance(v, str) else v for v in value if not (isinstance(v, str) and not v.strip()))


def _str_names(value) -> tuple[str, ...]:
    """None, 'a,b', or a list of strings / paths -> ('a', 'b')."""
    return tuple(str(v) for v in _names(value or ()))
