"""Hardware profiles: the built-in set loads, bad profile data is one ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline.firmware_sim import HardwareProfile, builtin_profiles, load_profiles
from fogline.protocol import ConfigError


def test_builtin_profiles_cover_the_three_reference_devices() -> None:
    profiles = builtin_profiles()
    assert {"mcu-gateway", "rpi4", "jetson-like"} <= set(profiles)
    rpi = profiles["rpi4"]
    assert rpi.name == "rpi4"
    assert rpi.device_class == "cpu-1t"
    assert rpi.threads == 1
    assert rpi.speed_factor == pytest.approx(3.0)
    assert profiles["jetson-like"].device_class == "cpu-4t"
    assert profiles["jetson-like"].threads == 4
    # The gateway's class has no local variant in any release: it always offloads.
    assert profiles["mcu-gateway"].device_class == "mcu"
    for profile in profiles.values():
        assert isinstance(profile, HardwareProfile)
        assert profile.link.rtt_ms > 0


def test_a_profiles_file_overrides_and_extends(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        """
[profiles.rpi4]
device_class = "cpu-1t"
threads = 1
max_in_flight = 1
speed_factor = 5.0

[profiles.nuc]
device_class = "cpu-2t"
threads = 2
max_in_flight = 4
[profiles.nuc.link]
rtt_ms = 2.0
"""
    )
    profiles = load_profiles(path)
    assert profiles["rpi4"].speed_factor == 5.0
    assert profiles["nuc"].link.rtt_ms == 2.0
    assert profiles["nuc"].name == "nuc"
    assert "jetson-like" in profiles


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[profiles.x]\ndevice_class='c'\nthreads=0\nmax_in_flight=1\n", "profiles.x.threads"),
        ("[profiles.x]\ndevice_class='c'\nthreads=1\nmax_in_flight=1\nspeed=2\n", "x.speed"),
        ("[profiles.x]\nthreads=1\nmax_in_flight=1\n", "profiles.x.device_class"),
        ("[profiles.x]\ndevice_class='a/b'\nthreads=1\nmax_in_flight=1\n", "device_class"),
        (
            "[profiles.x]\ndevice_class='c'\nthreads=1\nmax_in_flight=1\n[profiles.x.link]\nloss=1.5\n",
            "profiles.x.link.loss",
        ),
        ("[profiles.x]\ndevice_class='c'\nthreads=1\nmax_in_flight=1\nspeed_factor=0.5\n", "speed"),
        ("[profiles.'bad+name']\ndevice_class='c'\nthreads=1\nmax_in_flight=1\n", "profiles"),
        ("[profiles.x]\nname='y'\ndevice_class='c'\nthreads=1\nmax_in_flight=1\n", "x.name"),
        ("profiles = 3\n", "profiles"),
        ("[profiles\n", "TOML"),
    ],
)
def test_bad_profile_data_is_one_config_error_naming_the_field(
    tmp_path: Path, text: str, field: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profiles(path)
    assert field in info.value.message
    assert str(path) in info.value.message


def test_a_missing_profiles_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_profiles(tmp_path / "absent.toml")
