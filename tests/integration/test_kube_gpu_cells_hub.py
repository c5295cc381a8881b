"""``%%gpu`` from a kernel in another pod: the broker's API on TCP (``--api-port``).

A kernel in a user pod cannot reach the broker's Unix socket in the hub pod. It reaches
the API at ``GPULANE_BROKER_URL`` (broker/tcp_api.py), named by its server's hub token
alone. Here a real JupyterHub runs its managed broker on the
loopback Kubernetes API (one GPU); the kernel, a real ipykernel of a demo user, is given
no socket at all, only that URL and a token the hub made for the user; its cell runs in
a worker pod the broker creates (run by the node agent) and hands its names back.
Requests on that port without a token, or with a forged one, are refused.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_kube_gpu_cells import NAMESPACE, server_pod, workers
from tests.support.hubclient import logged_in
from tests.support.hubs import free_port, running_demo_hub
from tests.support.kernels import UserKernel
from tests.support.kube_agent import NodeAgent
from tests.support.kube_api import gpu_node, kube_api
from tests.support.users import need_module, wait_for

ADA = "gpl-demo-ada"
ADA_IP = "127.0.0.70"


def post(url: str, token: str | None) -> tuple[int, str]:
    body = json.dumps({"gpus": 1, "name": "x", "command": ["true"]}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    request = urllib.request.Request(url + "v1/jobs", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.timeout(240)
def test_a_kernel_without_the_socket_runs_a_cell_through_the_service_port(
    tmp_path: Path,
) -> None:
    need_module("kubernetes")
    need_module("kubespawner")
    with (
        kube_api(tmp_path) as (store, kubeconfig),
        NodeAgent(store, selector="gpulane.test/none=none") as agent,
    ):
        store.put("nodes", "", gpu_node("gpu-1", 1))
        store.put("pods", NAMESPACE, server_pod(ADA, ADA_IP))

        api_port = free_port()

        def config(state: Path) -> str:
            return f"""
import os
os.environ["KUBECONFIG"] = {str(kubeconfig)!r}
c.GpulaneHub.simulate_gpus = 0
c.GpulaneHub.gpu_source = "k8s"
c.GpulaneHub.k8s_namespace = {NAMESPACE!r}
c.GpulaneHub.broker_args = ["--worker-python", {sys.executable!r},
                            "--api-ip", "127.0.0.1", "--api-port", "{api_port}"]
"""

        with running_demo_hub("gpulane-kube-cells-", config) as hub:
            wait_for(lambda: "API for hub-token clients" in hub.log_text(), 60, what="the API")
            url = f"http://127.0.0.1:{api_port}/"
            ada = logged_in(hub.url, hub.passwords, ADA)
            # Without a token, or with a forged one, the port answers nothing of the API.
            status, text = post(url, None)
            assert status == 401 and "send your server's JupyterHub token" in text, text
            status, text = post(url, "forged" + "0" * 26)
            assert status in (401, 403) and "not valid" in text, text
            folder = Path(tempfile.mkdtemp(prefix="gpulane-kernels-"))
            folder.chmod(0o755)
            env = {
                "GPULANE_BACKEND": "kubernetes",
                "GPULANE_BROKER_URL": url,
                "JUPYTERHUB_API_TOKEN": ada.token or "",
                "GPULANE_CALLBACK_HOST": ADA_IP,
                "GPULANE_SOCKET": str(folder / "no-broker-here.sock"),  # no socket: TCP only
            }
            kernel = UserKernel(ADA, None, folder, env)
            try:
                assert kernel.execute("%load_ext gpulane").status == "ok"
                assert kernel.execute("base = 40").status == "ok"
                cell = kernel.execute(
                    "%%gpu --time 5m\nprint('over tcp', flush=True)\nanswer = base + 2",
                    timeout=120,
                )
                assert cell.status == "ok", (cell.messages, hub.log_text()[-3000:])
                assert "over tcp" in cell.stream()
                assert kernel.execute("print(answer)").stream().strip() == "42"
                assert len(agent.workers) == 1
                wait_for(lambda: not workers(store), 20, what="the worker pod deleted")
            finally:
                kernel.shutdown()
