"""The image HEALTHCHECK: GET /livez of this container's api, found through the real config.

Run as `python -m appliance.healthcheck`. It imports only the config loader and urllib (no CLI),
so a check every few seconds stays cheap. Exit 0 healthy, 1 unhealthy (Docker reserves 2).
A container whose roles leave out the api has no /livez; it reports healthy and leaves program
liveness to supervisord.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from appliance.config import load_config
from appliance.errors import ConfigError

WILDCARDS = {"0.0.0.0", "::", ""}  # noqa: S104 - bind addresses, mapped to loopback below


def livez_url(host: str, port: int) -> str:
    if host in WILDCARDS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/livez"


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"healthcheck: invalid config: {exc}", file=sys.stderr)
        return 1
    if "api" not in config.appliance.roles:
        return 0
    url = livez_url(config.api.bind, config.api.port)
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - fixed http URL
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
