"""Device profiles: datasheet figures of edge devices as TOML data files, and their loader.

Each profile gives RAM, flash, a reserve for the runtime/OS, and a peak compute figure with
its precision and source. ``budget_bytes`` (RAM minus the reserve) is what a fine-tuning step
may use. Built-in profiles live in ``actcomp/devices/profiles/``; a user's own file loads with
``load_device("path/to/board.toml")``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILES = Path(__file__).resolve().parent / "profiles"
KINDS = ("mcu", "sbc", "edge-gpu")


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
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _field_error(where, f.name, "a whole number of bytes >= 0", value)
        elif f.type == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise _field_error(where, f.name, "a positive number", value)
            value = float(value)
        elif not isinstance(value, str) or not value:
            raise _field_error(where, f.name, "a non-empty string", value)
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
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"device file '{path}': not valid TOML ({error})") from None
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
