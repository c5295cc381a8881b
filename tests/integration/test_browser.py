"""In a real browser (Chromium, through Playwright) against a real JupyterHub.

Ben logs in through the hub's login page, runs a ``%%gpu`` cell in JupyterLab, then
runs another while Ada holds the only GPU and sees the queue card, then opens the
dashboard under /services/gpulane/ (OAuth) and sees Ada on the GPU (its slices),
himself in the queue, the chart's axes, 24-hour times, his ended job and the
fair-share standings; Ada, an admin, is asked to confirm before cancelling Ben's
job. The hub cuts its GPU into two slices. Screenshots go to test-artifacts/ in the
repository root.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpulane.scheduler.http import UnixJSONClient
from tests.support.hubclient import HubUser
from tests.support.hubs import RunningHub, running_demo_hub
from tests.support.users import need, need_module

ADA, BEN = "gpl-demo-ada", "gpl-demo-ben"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CELL = "%%gpu\nimport os\nprint('GPU cell ran on', os.environ['CUDA_VISIBLE_DEVICES'])\nanswer = 42"
WAITING_CELL = "%%gpu\nprint('after the wait, ran on', os.environ['CUDA_VISIBLE_DEVICES'], answer)"
SECOND = 1000  # Playwright counts milliseconds
HH_MM_SS = re.compile(r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d$")  # 24-hour, as the cards write it


@pytest.fixture(scope="module")
def hub(unix_users: tuple[str, ...]) -> Iterator[RunningHub]:
    """This module's own hub: one GPU in two slices, so the GPU rows show their slices."""
    need(os.geteuid() == 0, "the hub tests spawn servers as real Unix users, which needs root")
    with running_demo_hub("gpulane-browser-", lambda state: "c.GpulaneHub.slices = 2\n") as hub:
        yield hub


def broker(hub: Any, token: str, method: str, path: str) -> Any:
    client = UnixJSONClient(hub.state / "run" / "broker.sock", token=token)
    try:
        return client.request(method, path)
    finally:
        client.close()


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    sync_api = need_module("playwright.sync_api")
    need(CHROMIUM.exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def ada(hub: Any) -> Iterator[HubUser]:
    """Ada, through the API: logged in, with a token, a server and a kernel."""
    user = HubUser(hub.url, ADA)
    assert user.login(hub.passwords[ADA]).status_code == 302
    user.make_token()
    user.start_server()
    user.kernel = user.new_kernel()
    yield user
    with contextlib.suppress(Exception):
        user.server_api("DELETE", f"/kernels/{user.kernel}")
    user.close()


def _cancel_everything(hub: Any, ada: HubUser) -> None:
    """Ada is the gpulane admin: leave the broker idle for the tests that follow."""
    with contextlib.suppress(Exception):
        status = broker(hub, ada.token, "GET", "/v1/status")
        for job in status["running"] + status["queue"]:
            broker(hub, ada.token, "DELETE", f"/v1/jobs/{job['id']}")
        wait_until(
            lambda: (
                not any(
                    broker(hub, ada.token, "GET", "/v1/status")[k] for k in ("running", "queue")
                )
            ),
            30,
            "an idle broker",
        )


@pytest.mark.timeout(240)
def test_ben_runs_gpu_cells_in_jupyterlab_and_sees_the_dashboard(
    hub: Any, chromium: Any, ada: HubUser
) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("browser-*.png"):  # only this run's pictures
        old.unlink()
    notebook = f"gpulane-browser-{uuid.uuid4().hex[:8]}.ipynb"
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(30 * SECOND)
    page = context.new_page()
    server = f"{hub.url}/user/{BEN}"
    try:
        # Log in through the hub's own form; the hub spawns Ben's server and opens /lab.
        page.goto(f"{hub.url}/hub/login")
        page.fill("#username_input", BEN)
        page.fill("#password_input", hub.passwords[BEN])
        page.click("#login_submit")
        page.wait_for_url(re.compile(rf"/user/{BEN}/lab"), timeout=90 * SECOND)
        page.wait_for_selector(".jp-LabShell", timeout=90 * SECOND)

        # A fresh notebook with a Python kernel, made through the server's contents API.
        xsrf = next(
            c["value"] for c in context.cookies(f"{server}/api/contents") if c["name"] == "_xsrf"
        )
        created = page.request.put(
            f"{server}/api/contents/{notebook}",
            headers={"X-XSRFToken": xsrf, "Content-Type": "application/json"},
            data=json.dumps({"type": "notebook", "format": "json", "content": _empty_notebook()}),
        )
        assert created.status == 201, created.text()
        # No "Jupyter news?" toast over the outputs in the screenshots.
        quiet = page.request.put(
            f"{server}/lab/api/settings/@jupyterlab/apputils-extension:notification",
            headers={"X-XSRFToken": xsrf, "Content-Type": "application/json"},
            data=json.dumps({"raw": json.dumps({"fetchNews": "false"})}),
        )
        assert quiet.ok, quiet.text()
        # JupyterLab drops a cell run before the notebook has its kernel: wait until
        # the kernel's websocket opens and the status bar says the kernel is idle.
        with page.expect_websocket(lambda ws: "/api/kernels/" in ws.url, timeout=60 * SECOND):
            page.goto(f"{server}/lab/tree/{notebook}")
        expect(page.locator("#jp-main-statusbar")).to_contain_text(
            re.compile(r"Python 3 \(ipykernel\) \| Idle"), timeout=60 * SECOND
        )
        cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
        expect(cells.first).to_be_visible()

        # 1. The GPU is free: the cell runs at once and its card says completed.
        _type_and_run(page, cells.nth(0), CELL)
        first = cells.nth(0).locator(".jp-OutputArea")
        expect(first).to_contain_text("GPU cell ran on 0", timeout=60 * SECOND)
        expect(first.locator(".gpulane-card")).to_contain_text("completed", timeout=30 * SECOND)
        expect(first).to_contain_text("gpulane")
        page.screenshot(path=ARTIFACTS / "browser-1-gpu-cell-completed.png")

        # 2. Ada holds the GPU (a background job); Ben's next cell waits in the queue.
        held = _in_a_thread(
            ada.run,
            ada.kernel,
            "%%gpu --bg --name ada-holds\nimport time\ntime.sleep(90)",
        )
        assert held.reply["status"] == "ok", held.messages
        running = wait_until(
            lambda: broker(hub, ada.token, "GET", "/v1/status")["running"], 30, "ada's job"
        )
        assert running[0]["user"] == ADA
        _type_and_run(page, cells.nth(1), WAITING_CELL)
        second = cells.nth(1).locator(".jp-OutputArea")
        card = second.locator(".gpulane-card")
        expect(card).to_contain_text("waits for a GPU", timeout=30 * SECOND)
        expect(card).to_contain_text("position 1 in the queue")
        expect(card).to_contain_text(f"GPU 0: {ADA}, running")
        page.screenshot(path=ARTIFACTS / "browser-2-gpu-cell-waits-in-queue.png")

        # 3. The dashboard, in the same browser: the hub's OAuth flow lets Ben in.
        dashboard = context.new_page()
        dashboard.goto(f"{hub.url}/services/gpulane/")
        dashboard.wait_for_url(re.compile(r"/services/gpulane/(\?.*)?$"), timeout=30 * SECOND)
        expect(dashboard.locator("#who")).to_contain_text(f"signed in as {BEN}")
        expect(dashboard.locator("#gpus tbody")).to_contain_text(ADA)
        expect(dashboard.locator("#queue tbody")).to_contain_text(BEN)
        expect(dashboard.locator("#error")).to_be_empty()
        _check_dashboard_for_ben(dashboard, expect)
        dashboard.screenshot(path=ARTIFACTS / "browser-3-dashboard.png", full_page=True)
        dashboard.close()

        # 4. Ada, an admin, on her dashboard: cancelling Ben's job asks first, naming him
        # and the job; saying no leaves it queued.
        queued = broker(hub, ada.token, "GET", "/v1/status")["queue"]
        assert [j["user"] for j in queued] == [BEN]
        _ada_dismisses_cancelling_bens_job(chromium, hub, queued[0]["id"], expect)
        assert [j["id"] for j in broker(hub, ada.token, "GET", "/v1/status")["queue"]] == [
            queued[0]["id"]
        ]

        # Ada lets go (cancelling her job); Ben's waiting cell gets the GPU and finishes.
        broker(hub, ada.token, "DELETE", f"/v1/jobs/{running[0]['id']}")
        expect(second).to_contain_text("after the wait, ran on 0 42", timeout=60 * SECOND)
        expect(card).to_contain_text("completed", timeout=30 * SECOND)
        page.screenshot(path=ARTIFACTS / "browser-4-gpu-cell-ran-after-the-wait.png")

        # 5. Ben's dashboard lists his ended jobs with their reasons, never Ada's.
        dashboard = context.new_page()
        dashboard.goto(f"{hub.url}/services/gpulane/")
        ended = dashboard.locator("#ended tbody")
        expect(ended.locator("tr")).to_have_count(2, timeout=30 * SECOND)
        expect(ended).not_to_contain_text(ADA)
        expect(ended).to_contain_text("completed")
        dashboard.screenshot(path=ARTIFACTS / "browser-6-ben-ended-jobs.png", full_page=True)
        dashboard.close()
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=ARTIFACTS / "browser-failure.png")
        raise
    finally:
        with contextlib.suppress(Exception):
            _shut_down_notebook(page, context, server, notebook)
        context.close()
        _cancel_everything(hub, ada)


def _check_dashboard_for_ben(dashboard: Any, expect: Any) -> None:
    """Slices, the chart's axes, 24-hour times, Ben's ended job and the standings."""
    gpu_row = dashboard.locator("#gpus tbody tr").first
    expect(gpu_row).to_contain_text("[2/2 slices]")  # Ada's job holds the whole GPU
    expect(gpu_row).to_contain_text("(2/2 slices)")
    expect(dashboard.locator("#y-label")).to_have_text("GPUs in use")
    expect(dashboard.locator("#x-label")).to_contain_text("time (24-hour, local)")
    ticks = dashboard.locator("#chart text.xtick")
    expect(ticks).to_have_count(5)
    assert all(re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", t) for t in ticks.all_text_contents())
    assert dashboard.locator("#chart text.ytick").all_text_contents() == ["0", "0.5", "1"]
    updated = dashboard.locator("#who").text_content().rsplit("updated ", 1)[1]
    assert HH_MM_SS.match(updated), updated
    starts_by = dashboard.locator("#queue tbody tr td").nth(5).text_content()
    assert HH_MM_SS.match(starts_by) or starts_by == "unknown", starts_by
    # Ben's first cell has ended: listed with its state, its end in 24-hour time, a reason.
    ended = dashboard.locator("#ended tbody tr")
    expect(ended).to_have_count(1)
    cells = ended.first.locator("td").all_text_contents()
    assert cells[1] == BEN and cells[3] == "completed" and HH_MM_SS.match(cells[4]), cells
    assert cells[5], cells
    expect(dashboard.locator("#ended-scope")).to_have_text("your jobs of the last day")
    standings = dashboard.locator("#standings tbody")
    expect(standings).to_contain_text(ADA)
    expect(standings).to_contain_text(BEN)
    expect(dashboard.locator("#standings-note")).to_contain_text("half-life of")


@contextlib.contextmanager
def _dashboard_as(chromium: Any, hub: Any, user: str) -> Iterator[Any]:
    """A fresh browser that logs ``user`` in through the hub's form, on the dashboard."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30 * SECOND)
    try:
        page = context.new_page()
        page.goto(f"{hub.url}/hub/login?next=/services/gpulane/")
        page.fill("#username_input", user)
        page.fill("#password_input", hub.passwords[user])
        page.click("#login_submit")
        page.wait_for_url(re.compile(r"/services/gpulane/(\?.*)?$"), timeout=60 * SECOND)
        yield page
    finally:
        context.close()


def _ada_dismisses_cancelling_bens_job(chromium: Any, hub: Any, job: int, expect: Any) -> None:
    """Ada logs in, clicks cancel on Ben's queued job and says no to the question."""
    with _dashboard_as(chromium, hub, ADA) as page:
        expect(page.locator("#who")).to_contain_text(f"signed in as {ADA} (admin)")
        expect(page.locator("#ended-scope")).to_contain_text("every user")
        expect(page.locator("#ended tbody")).to_contain_text(BEN)  # an admin sees all
        asked: list[str] = []

        def say_no(dialog: Any) -> None:
            asked.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", say_no)
        row = page.locator("#queue tbody tr", has_text=BEN)
        row.get_by_role("button", name="cancel").click()
        wait_until(lambda: asked, 10, "the confirmation")
        assert len(asked) == 1 and asked[0].startswith(f"confirm: Cancel job {job} "), asked
        assert asked[0].endswith(f"of user {BEN}? Their work stops."), asked
        page.wait_for_timeout(2.5 * SECOND)  # a refresh comes and goes: the job stays
        expect(row).to_contain_text(BEN)
        expect(page.locator("#error")).to_be_empty()
        page.screenshot(path=ARTIFACTS / "browser-5-admin-dashboard-after-no.png", full_page=True)


def _in_a_thread(function: Any, *args: Any) -> Any:
    """Run ``function`` off the main thread: Playwright's sync API keeps an event loop there."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result(120)


def _empty_notebook() -> dict[str, Any]:
    return {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": uuid.uuid4().hex[:8],
             "metadata": {}, "outputs": [], "source": ""},
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                           "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }  # fmt: skip


def _type_and_run(page: Any, cell: Any, code: str) -> None:
    """Click into the cell's editor, type the code as a user would, then Shift+Enter."""
    from playwright.sync_api import expect

    editor = cell.locator(".cm-content")
    editor.click()
    page.keyboard.type(code)
    expect(editor).to_have_text(re.compile(re.escape(code.splitlines()[-1])))
    page.keyboard.press("Shift+Enter")


def _shut_down_notebook(page: Any, context: Any, server: str, notebook: str) -> None:
    """Stop the notebook's kernel (and with it any job it still has) and delete the file."""
    xsrf = next(
        c["value"] for c in context.cookies(f"{server}/api/contents") if c["name"] == "_xsrf"
    )
    headers = {"X-XSRFToken": xsrf}
    for session in page.request.get(f"{server}/api/sessions").json():
        if session.get("path") == notebook:
            page.request.delete(f"{server}/api/sessions/{session['id']}", headers=headers)
    page.request.delete(f"{server}/api/contents/{notebook}", headers=headers)


def _dashboard_state(hub: Any, token: str) -> dict[str, Any]:
    response = requests.get(
        f"{hub.url}/services/gpulane/api/state",
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.timeout(180)
def test_dashboard_data_ended_reasons_are_private_and_standings_public(
    hub: Any, ada: HubUser, chromium: Any
) -> None:
    """api/state: a user sees their own ended jobs' reasons and an admin everyone's;
    every user sees everyone's decayed GPU-hours and share (as sshare shows them)."""
    ben = HubUser(hub.url, BEN)
    try:
        assert ben.login(hub.passwords[BEN]).status_code == 302
        ben.make_token()
        ben.start_server()
        ben.kernel = ben.new_kernel()
        # Ada's cell holds its slice for 3 s first: over a GPU-second of her own, so she
        # has a standing whether or not the browser test ran before this one.
        for user, name, hold in ((ada, "ada-fails", 3), (ben, "ben-fails", 0)):
            code = (
                f"%%gpu --name {name}\nimport time\ntime.sleep({hold})\nraise RuntimeError('boom')"
            )
            run = _in_a_thread(user.run, user.kernel, code)  # Playwright's loop may be alive
            assert run.reply["status"] == "error", run.messages

        def both_ended() -> dict[str, Any] | None:
            state = _dashboard_state(hub, ada.token)
            return (
                state if {"ada-fails", "ben-fails"} <= {j["name"] for j in state["ended"]} else None
            )

        admin_view = wait_until(both_ended, 30, "both failed jobs in the admin's ended list")
        by_name = {j["name"]: j for j in admin_view["ended"]}
        for name, owner in (("ada-fails", ADA), ("ben-fails", BEN)):
            job = by_name[name]
            assert job["user"] == owner and job["state"] == "failed", job
            assert re.fullmatch(r"exited with status \d+|killed by \w+", job["reason"]), job
        bens_view = _dashboard_state(hub, ben.token)
        assert bens_view["ended"], bens_view
        assert {j["user"] for j in bens_view["ended"]} == {BEN}  # never Ada's reasons
        assert by_name["ada-fails"]["id"] not in {j["id"] for j in bens_view["ended"]}
        assert by_name["ben-fails"]["reason"] in {j["reason"] for j in bens_view["ended"]}
        # Standings: public, the same for both, decayed GPU-hours and shares that sum to 1.
        # (Ben's short cells used under a GPU-second, the floor below which an idle user drops off.)
        for view in (admin_view, bens_view):
            rows = {r["user"]: r for r in view["standings"]}
            assert ADA in rows, rows
            assert all(r["gpu_hours"] >= 1 / 3600 for r in rows.values()), rows
            assert all(r["half_life"] == 600 for r in rows.values()), rows
            assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9, rows
        assert [r["user"] for r in admin_view["standings"]] == [
            r["user"] for r in bens_view["standings"]
        ]
        assert rows[ADA]["gpu_hours"] >= 1 / 3600  # at least her failing cell's 3 s on a slice
        # The same on the page: the admin sees both failures and their reasons, Ben his own.
        from playwright.sync_api import expect

        for user, shot in (
            (ADA, "browser-7-admin-failed-jobs.png"),
            (BEN, "browser-8-ben-failed-job.png"),
        ):
            with _dashboard_as(chromium, hub, user) as page:
                ended = page.locator("#ended tbody")
                expect(ended).to_contain_text(by_name["ben-fails"]["reason"])
                fails = ended.locator("tr", has_text="ada-fails")
                expect(fails).to_have_count(1 if user == ADA else 0)
                page.screenshot(path=ARTIFACTS / shot, full_page=True)
    finally:
        with contextlib.suppress(Exception):
            ben.server_api("DELETE", f"/kernels/{ben.kernel}")
        ben.close()
