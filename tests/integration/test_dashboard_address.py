"""The dashboard served as on zero-to-jupyterhub: on every address of the hub's machine (a
hub pod's), the gpulane service's URL not on loopback, so that a proxy in another pod
reaches it. Through a real JupyterHub and its configurable-http-proxy; the hub's OAuth
still decides who sees what, also for a request sent straight to that address.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import requests

from tests.support.hubclient import HubUser
from tests.support.hubs import free_port, running_demo_hub
from tests.support.users import need

ADA = "gpl-demo-ada"


def outside_address() -> str | None:
    """This machine's address on its network (what a pod's IP is), not loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if ipaddress.ip_address(address).is_loopback else address


def test_the_proxy_reaches_the_dashboard_on_a_non_loopback_url(unix_users: object) -> None:
    need(os.geteuid() == 0, "the hub tests spawn servers as real Unix users, which needs root")
    address = outside_address()
    need(address is not None, "this machine has no address besides loopback")
    port = free_port()

    def extra(_: object) -> str:
        return (
            f"\nc.GpulaneHub.dashboard_port = {port}\n"
            'c.GpulaneHub.dashboard_ip = "0.0.0.0"\n'
            f'c.GpulaneHub.dashboard_url = "http://{address}:{port}"\n'
        )

    with running_demo_hub("gpulane-dashaddr-", extra) as hub:
        ada = HubUser(hub.url, ADA)
        try:
            assert ada.login(hub.passwords[ADA]).status_code == 302
            token = {"Authorization": f"token {ada.make_token()}"}
            # Through the hub's proxy, whose route for /services/gpulane/ is that URL.
            routed = requests.get(
                f"{hub.url}/services/gpulane/api/state", headers=token, timeout=30
            )
            assert routed.status_code == 200, routed.text
            assert "running" in routed.json()
            # The same address, straight (as a kernel in a user pod would send): the hub's
            # token decides; none, or a forged one, is turned away.
            direct = f"http://{address}:{port}/services/gpulane/api/state"
            assert requests.get(direct, headers=token, timeout=30).status_code == 200
            for headers in ({}, {"Authorization": "token forged-0123456789"}):
                refused = requests.get(direct, headers=headers, allow_redirects=False, timeout=30)
                assert refused.status_code in (302, 403), refused.status_code
        finally:
            ada.close()
