"""Device profiles: datasheet figures of edge devices as TOML data files, and their loader.

Each profile gives RAM, flash, a reserve for the runtime/OS, and a peak compute figure with
its precision and source. ``budget_bytes`` (RAM minus the reserve) is what a fine-tuning step
may use. Built-in profiles live in ``actcomp/devices/profiles/``; a user's own file loads with
``load_device("path/to/board.toml")``. A profile is checked field by field: byte counts are
whole numbers up to MAX_BYTES, the peak a finite number up to MAX_OPS_PER_S, strings printable
(no terminal escape codes); errors name the file and the field.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILES = Path(__file__).resolve().parent / "profiles"
KINDS = ("mcu", "sbc", "edge-gpu")
MAX_BYTES = 2**50  # 1 PiB: far above any edge device; larger figures are typing errors
MAX_OPS_PER_S = 1e18  # one exa-operation per second


@dataclass(frozen=True)
class DeviceProfile:
    """One device: memory figures in bytes, peak compute in operations per second."""

    name: str
    title: str
    kind: str
    ram_bytes: int
    flash_bytes: int
    reserve_bytes: int
    peak_ops_per_s: float
    peak_precision: str
    source: str
    path: str = ""

    @property
    def budget_bytes(self) -> int:
        """RAM left for a training step: ``ram_bytes - reserve_bytes``."""
        return self.ram_bytes - self.reserve_bytes


def _field_error(where: str, name: str, expected: str, value: object) -> ValueError:
    return ValueError(f"device file '{where}': field '{name}' must be {expected}, got {value!r}")


def parse_device(data: dict, where: str = "<dict>") -> DeviceProfile:
    """Validate a profile's fields; errors name the file and the field."""
    values = {}
    for f in fields(DeviceProfile):
        if f.name == "path":
            continue
        if f.name not in data:
            raise ValueError(f"device file '{where}': missing field '{f.name}'")
        value = data[f.name]
        if f.type == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTES:
                raise _field_error(where, f.name, f"a whole number of bytes from 0 to {MAX_BYTES} (1 PiB)", value)
        elif f.type == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 < value <= MAX_OPS_PER_S):
                raise _field_error(where, f.name, f"a positive finite number up to {MAX_OPS_PER_S:g}", value)
            value = float(value)
        elif not isinstance(value, str) or not value or not value.isprintable():
            raise _field_error(where, f.name, "a non-empty string of printable characters (no control codes)", value)
        values[f.name] = value
    unknown = sorted(set(data) - {f.name for f in fields(DeviceProfile)})
    if unknown:
        raise ValueError(f"device file '{where}': unknown field(s) {', '.join(map(repr, unknown))}")
    if values["kind"] not in KINDS:
        raise _field_error(where, "kind", f"one of {', '.join(KINDS)}", values["kind"])
    if values["ram_bytes"] == 0:
        raise _field_error(where, "ram_bytes", "a whole number of bytes >= 1", 0)
    if values["reserve_bytes"] >= values["ram_bytes"]:
        raise _field_error(where, "reserve_bytes", f"less than ram_bytes ({values['ram_bytes']})", values["reserve_bytes"])
    return DeviceProfile(**values, path=where)


def _read(path: Path) -> DeviceProfile:
    if not path.is_file():
        raise ValueError(f"device file '{path}' is not a file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"device file '{path}' cannot be read ({type(error).__name__}: {error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"device file '{path}': not valid TOML ({error})") from None
    except RecursionError:
        raise ValueError(f"device file '{path}': not valid TOML (nested too deeply)") from None
    return parse_device(data, str(path))


def list_devices() -> list[DeviceProfile]:
    """The built-in profiles, sorted by RAM."""
    return sorted((_read(p) for p in PROFILES.glob("*.toml")), key=lambda d: d.ram_bytes)


def load_device(name_or_path: str | Path) -> DeviceProfile:
    """A built-in profile by name (``"stm32h743"``) or a profile file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise ValueError(f"device file '{path}' does not exist")
        return _read(path)
    builtin = PROFILES / f"{name_or_path}.toml"
    if not builtin.exists():
        names = ", ".join(d.name for d in list_devices())
        raise ValueError(f"unknown device {str(name_or_path)!r}; built-in: {names}; or give a .toml file")
    return _read(builtin)


__all__ = ["DeviceProfile", "KINDS", "list_devices", "load_device", "parse_device"]
