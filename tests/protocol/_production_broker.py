"""deploy/mosquitto's production config, made runnable in a test: its container paths and
ports moved into tmp, a password file made with ``mosquitto_passwd``. Used by the ACL
tests and by the cloud's login test (loaded by path: there is one copy of the rules)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "mosquitto"
PASSWORDS = {"fogline-cloud": "cloud-pw", "dev-1": "pw-1", "dev-2": "pw-2"}


def production_config(tmp_path: Path, plain: int, tls: int, certs: Path) -> list[str]:
    """deploy/mosquitto/mosquitto.conf with its container paths and ports moved."""
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    data = tmp_path / "data"
    data.mkdir()
    replacements = {
        "/mosquitto/config/passwd": str(passwd),
        "/mosquitto/config/acl": str(DEPLOY / "acl"),
        "/mosquitto/config/certs/": f"{certs}/",
        "/mosquitto/data/": f"{data}/",
        "listener 1883 127.0.0.1": f"listener {plain} 127.0.0.1",
        "listener 8883": f"listener {tls} 127.0.0.1",
    }
    lines = []
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        if line.startswith("#") or line.startswith("log_dest"):
            continue  # comments; and the test broker logs to its own file
        for old, new in replacements.items():
            line = line.replace(old, new)
        lines.append(line)
    text = "\n".join(lines)
    assert " /mosquitto/" not in text, "a path in mosquitto.conf was not moved for the test"
    return lines
