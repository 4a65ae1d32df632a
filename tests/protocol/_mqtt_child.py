"""A client process that tests can kill: connects with a last will, says ``ready`` on
stdout, then idles until it is killed (SIGKILL: no DISCONNECT, so the broker must send
the will) or until stdin closes (then it closes cleanly).

Usage: ``python _mqtt_child.py <url> <protocol> <will topic> <will payload>``
"""

from __future__ import annotations

import sys

from fogline.protocol import MqttSettings, MqttTransport, Will


def main(argv: list[str]) -> int:
    url, protocol, will_topic, will_payload = argv
    settings = MqttSettings(url=url, protocol=protocol)  # type: ignore[arg-type]
    transport = MqttTransport(settings, will=Will(will_topic, will_payload.encode()))
    transport.connect(timeout=10.0)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        sys.stdin.read()  # blocks until the parent closes stdin (or kills us)
    finally:
        transport.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
