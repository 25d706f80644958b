import pytest

from actcomp.app.cli import main
from actcomp.devices import KINDS, list_devices, load_device

EXPECTED = {
    "jetson-nano-4gb", "jetson-orin-nano-8gb", "jetson-agx-orin-32gb", "raspberry-pi-4-4gb",
    "raspberry-pi-5-8gb", "stm32f746", "stm32h743", "esp32-s3", "nrf52840",
}

GOOD = """
name = "my-board"
title = "My board"
kind = "mcu"
ram_bytes = 196608
flash_bytes = 524288
reserve_bytes = 16384
peak_ops_per_s = 1e8
peak_precision = "fp32"
source = "my measurements"
"""


def test_builtin_profiles():
    devices = {d.name: d for d in list_devices()}
    assert set(devices) == EXPECTED
    for d in devices.values():
        assert d.kind in KINDS and 0 < d.budget_bytes < d.ram_bytes and d.source
    f746 = devices["stm32f746"]
    assert (f746.ram_bytes, f746.flash_bytes) == (320 * 1024, 1024 * 1024)
    assert load_device("stm32h743").ram_bytes == (192 + 864) * 1024


def test_user_file(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    d = load_device(path)
    assert d.name == "my-board" and d.budget_bytes == 196608 - 16384


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('ram_bytes = 196608\n', ''), "missing field 'ram_bytes'"),
        (lambda t: t.replace('ram_bytes = 196608', 'ram_bytes = "192KB"'), "field 'ram_bytes' must be a whole number"),
        (lambda t: t.replace('kind = "mcu"', 'kind = "fridge"'), "field 'kind' must be one of mcu, sbc, edge-gpu"),
        (lambda t: t.replace('reserve_bytes = 16384', 'reserve_bytes = 999999'), "field 'reserve_bytes' must be less than ram_bytes"),
        (lambda t: t.replace('peak_ops_per_s = 1e8', 'peak_ops_per_s = -1'), "field 'peak_ops_per_s' must be a positive finite number"),
        (lambda t: t.replace('peak_ops_per_s = 1e8', 'peak_ops_per_s = 1e42'), "field 'peak_ops_per_s' must be a positive finite number up to 1e\\+18"),
        (lambda t: t.replace('peak_ops_per_s = 1e8', 'peak_ops_per_s = nan'), "field 'peak_ops_per_s' must be a positive finite number"),
        (lambda t: t.replace('peak_ops_per_s = 1e8', 'peak_ops_per_s = inf'), "field 'peak_ops_per_s' must be a positive finite number"),
        (lambda t: t.replace('ram_bytes = 196608', 'ram_bytes = 1' + '0' * 42), "field 'ram_bytes' must be a whole number of bytes from 0 to"),
        (lambda t: t.replace('name = "my-board"', 'name = "my\\u001b[2J\\u001b[31mboard"'), "field 'name' must be a non-empty string of printable characters"),
        (lambda t: t.replace('title = "My board"', 'title = "My\\u0007board"'), "field 'title' must be a non-empty string of printable characters"),
        (lambda t: t + 'colour = "red"\n', "unknown field(s) 'colour'"),
        (lambda t: t + 'this is = not toml\n', "not valid TOML"),
        (lambda t: "x = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML (nested too deeply)"),
    ],
)
def test_malformed_file_names_the_field(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")) as info:
        load_device(path)
    assert "bad.toml" in str(info.value)


def test_devices_command(capsys, tmp_path):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPECTED)
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 1\n")
    assert main(["devices", "--file", str(bad)]) == 2
    assert "bad.toml" in capsys.readouterr().err


def test_a_directory_is_not_a_profile(tmp_path):
    (tmp_path / "board.toml").mkdir()
    with pytest.raises(ValueError, match="device file '.*board.toml' is not a file"):
        load_device(tmp_path / "board.toml")


def test_escape_codes_never_reach_the_terminal(capsys, tmp_path):
    """A profile whose name holds terminal escape codes is refused, and the error line shows
    them escaped (\\x1b), never raw."""
    path = tmp_path / "evil.toml"
    path.write_text(GOOD.replace('name = "my-board"', 'name = "\\u001b]0;owned\\u0007\\u001b[2J"'))
    assert main(["devices", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err and err.count("\n") == 1
