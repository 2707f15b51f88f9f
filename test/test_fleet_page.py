"""The fleet page at /ui/: what the admin app serves (headers, assets), then the page itself in Debian's headless
Chromium (driven by playwright, never a downloaded browser) against the three shells env.py starts.

`FRACTAL_UPDATE_SCREENSHOT=1` also writes the browser test's screenshot to docs/fleet-page.png.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fractal.auth.dev_keys import ensure_dev_keypair, mint_token
from fractal.config import DEV_PRIVATE_KEY_PATH, DEV_PUBLIC_KEY_PATH
from fractal.ui.views import ASSET_FILES, CONTENT_SECURITY_POLICY, static_dir
from test.processes import ROOT, Stack
from test.waiting import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = ROOT / "docs" / "fleet-page.png"
WAIT_MS = 15_000  # every wait in the browser is bounded; the page refreshes every second here


# --- what the app serves -------------------------------------------------------------------------------------
def test_the_admin_app_serves_the_page_under_a_strict_csp(admin_client: Any) -> None:
    page = admin_client.get("/ui/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    csp = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = page.get_data(as_text=True)
    # Nothing inline and nothing from elsewhere: every script and stylesheet is one of the served files.
    assert "<script>" not in html and " style=" not in html and " on" + "click=" not in html
    assert "http://" not in html and "https://" not in html
    for name in ASSET_FILES:
        asset = admin_client.get(f"/ui/{name}")
        assert asset.status_code == 200, name
        assert asset.get_data() == (static_dir() / name).read_bytes()
        assert asset.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert f'"{name}"' in html


def test_only_the_listed_assets_are_reachable(admin_client: Any) -> None:
    for path in ("/ui/index.html", "/ui/..%2fviews.py", "/ui/views.py", "/ui/nothing.js", "/ui/static/fleet.js"):
        answer = admin_client.get(path)
        assert answer.status_code == 404, path
        assert answer.get_json()["error"] == "NOT_FOUND"


def test_only_the_admin_app_serves_the_page(public_client: Any, host_client: Any) -> None:
    for client in (public_client, host_client):
        assert client.get("/ui/").status_code == 404
        assert client.get("/ui/fleet.js").status_code == 404


def test_the_page_is_not_in_the_admin_spec(admin_client: Any) -> None:
    spec = admin_client.get("/openapi.json").get_json()
    assert not any(path.startswith("/ui") for path in spec["paths"])


# --- the page in a real browser --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: ./commands test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def operator_token() -> str:
    keys = ensure_dev_keypair(ROOT / DEV_PRIVATE_KEY_PATH, ROOT / DEV_PUBLIC_KEY_PATH)
    return mint_token(keys.private_pem, user_id="fleet-page-operator", admin=True)


class Admin:
    """The admin API of the stack, for setting the scene and checking outcomes behind the page's back."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.stack = stack
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.stack.admin.url + path, headers=self.headers, timeout=10, **kwargs)

    def register(self, name: str, region: str, commit: str, *, capacity: int = 4, handshake: bool) -> None:
        body = {"instance_name": name, "region": region, "client_commit_hash": commit, "mandelbox_capacity": capacity}
        registered = self.call("POST", "/admin/instances", json=body)
        assert registered.status_code == 201, registered.text
        if handshake:
            hello = requests.post(
                self.stack.host.url + "/host/handshake",
                headers={"Authorization": f"Bearer {registered.json()['host_secret']}"},
                json={
                    "instance_name": name,
                    "ip": "10.1.2.3",
                    "client_commit_hash": commit,
                    "mandelbox_capacity": capacity,
                },
                timeout=10,
            )
            assert hello.status_code == 200, hello.text

    def status(self, name: str, region: str) -> str:
        rows = self.call("GET", "/admin/instances", params={"region": region}).json()["instances"]
        (row,) = [row for row in rows if row["instance_name"] == name]
        return str(row["status"])


def test_the_page_shows_the_fleet_new_hosts_and_drains_through_the_api(
    three_shells: Stack, browser: Any, operator_token: str, tmp_path: Path
) -> None:
    admin = Admin(three_shells, operator_token)
    suffix = uuid.uuid4().hex[:6]
    region, commit = f"ui-{suffix}-1", f"ui{suffix}"
    image = {
        "ami_id": "ami-ui",
        "active": True,
        "instance_type": "local.sim",
        "mandelbox_capacity": 4,
        "target_free": 6,
    }
    assert admin.call("PUT", f"/admin/images/{region}/{commit}", json=image).status_code in (200, 201)
    first, second, late = (f"ui-host-{suffix}-{n}" for n in ("a", "b", "late"))
    admin.register(first, region, commit, handshake=True)
    admin.register(second, region, commit, handshake=True)

    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    origins: set[str] = set()
    page.on("request", lambda request: origins.add("/".join(request.url.split("/")[:3])))
    try:
        page.goto(three_shells.admin.url + "/ui/?refresh=1", timeout=WAIT_MS)
        page.fill("#credential", operator_token, timeout=WAIT_MS)
        page.click("#sign-in", timeout=WAIT_MS)

        group = page.locator(f'article.group[data-region="{region}"][data-commit="{commit}"]')
        group.wait_for(timeout=WAIT_MS)
        row = group.locator(f'tr[data-instance="{first}"]')
        row.wait_for(timeout=WAIT_MS)
        assert row.locator("td.status").inner_text() == "ACTIVE"
        header = group.locator("header").inner_text()
        # Two ACTIVE hosts of 4: capacity 8, used 0, free 8 against a target of 6.
        assert "capacity 8" in header and "used 0" in header and "free 8 / target 6" in header, header
        assert "ACTIVE 2" in header
        assert page.evaluate("window.sessionStorage.getItem('fractal.credential')") == operator_token
        assert page.evaluate("window.localStorage.length") == 0 and context.cookies() == []

        # A host registered after the page loaded appears by itself: no reload, the same document.
        page.evaluate("window.fleetPageMarker = 'same document'")
        admin.register(late, region, commit, handshake=False)
        late_row = group.locator(f'tr[data-instance="{late}"]')
        late_row.wait_for(timeout=WAIT_MS)
        assert late_row.locator("td.status").inner_text() == "PRE_CONNECTION"
        assert page.evaluate("window.fleetPageMarker") == "same document"

        # Cancelling the confirmation drains nothing.
        group.locator(f'tr[data-instance="{second}"] button.drain').click(timeout=WAIT_MS)
        page.locator("#drain-dialog").wait_for(state="visible", timeout=WAIT_MS)
        page.click("#drain-cancel", timeout=WAIT_MS)
        page.locator("#drain-dialog").wait_for(state="hidden", timeout=WAIT_MS)

        # Drain from the page: the dialog names the host; confirming reaches the API.
        row.locator("button.drain").click(timeout=WAIT_MS)
        dialog = page.locator("#drain-dialog")
        dialog.wait_for(state="visible", timeout=WAIT_MS)
        assert first in dialog.inner_text()
        page.click("#drain-confirm", timeout=WAIT_MS)
        wait_for(lambda: admin.status(first, region) == "DRAINING", timeout_s=10, message="the host DRAINING")
        page.locator(f'tr[data-instance="{first}"] td.status:text-is("DRAINING")').wait_for(timeout=WAIT_MS)
        assert row.locator("button.drain").is_disabled()
        page.locator("#notice:has-text('now DRAINING')").wait_for(timeout=WAIT_MS)
        events = admin.call("GET", "/admin/events", params={"limit": 50}).json()["events"]
        drains = [e for e in events if e["instance_name"] == first and e["detail"].get("status") == "DRAINING"]
        assert drains and drains[0]["actor"] == "admin:fleet-page-operator", events[:5]
        # The recent-events table shows it too.
        page.locator(f'#events tr:has-text("{first}")').first.wait_for(timeout=WAIT_MS)
        assert admin.status(second, region) == "ACTIVE"

        shot = tmp_path / "fleet-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("FRACTAL_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)

        # Signing out forgets the credential.
        page.click("#sign-out", timeout=WAIT_MS)
        page.locator("#login").wait_for(state="visible", timeout=WAIT_MS)
        assert page.evaluate("window.sessionStorage.getItem('fractal.credential')") is None
    finally:
        context.close()
    # No CSP violation, no script error, and nothing fetched from anywhere but the admin API's origin.
    assert problems == [], problems
    assert origins == {three_shells.admin.url}, origins


def test_a_refused_credential_asks_again(three_shells: Stack, browser: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(three_shells.admin.url + "/ui/?refresh=1", timeout=WAIT_MS)
        page.fill("#credential", "fk_not-a-key", timeout=WAIT_MS)
        page.click("#sign-in", timeout=WAIT_MS)
        page.locator("#login-error:has-text('refused')").wait_for(timeout=WAIT_MS)
        assert page.locator("#login").is_visible()
        assert page.evaluate("window.sessionStorage.getItem('fractal.credential')") is None
        # A user's token is valid but not an operator's: 403, asked again.
        keys = ensure_dev_keypair(ROOT / DEV_PRIVATE_KEY_PATH, ROOT / DEV_PUBLIC_KEY_PATH)
        page.fill("#credential", mint_token(keys.private_pem, user_id="not-an-operator"), timeout=WAIT_MS)
        page.click("#sign-in", timeout=WAIT_MS)
        page.locator("#login-error:has-text('may not read the fleet')").wait_for(timeout=WAIT_MS)
    finally:
        context.close()


def test_an_api_key_signs_in_and_a_read_only_one_cannot_drain(
    three_shells: Stack, browser: Any, operator_token: str
) -> None:
    """Automation's credential works on the page too: an `admin:read` key sees the fleet; its drain is refused
    (403 FORBIDDEN, shown as a notice) and the host stays ACTIVE."""
    admin = Admin(three_shells, operator_token)
    suffix = uuid.uuid4().hex[:6]
    region, commit, host = f"uikey-{suffix}-1", f"uikey{suffix}", f"uikey-host-{suffix}"
    image = {"ami_id": "ami-ui", "active": True, "instance_type": "local.sim", "mandelbox_capacity": 4}
    assert admin.call("PUT", f"/admin/images/{region}/{commit}", json=image).status_code in (200, 201)
    admin.register(host, region, commit, handshake=True)
    created = admin.call("POST", "/admin/api-keys", json={"name": f"page-{suffix}", "scopes": ["admin:read"]})
    assert created.status_code == 201, created.text
    key = created.json()["key"]

    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(three_shells.admin.url + "/ui/?refresh=1", timeout=WAIT_MS)
        page.fill("#credential", key, timeout=WAIT_MS)
        page.click("#sign-in", timeout=WAIT_MS)
        row = page.locator(f'article.group[data-region="{region}"] tr[data-instance="{host}"]')
        row.wait_for(timeout=WAIT_MS)
        row.locator("button.drain").click(timeout=WAIT_MS)
        page.click("#drain-confirm", timeout=WAIT_MS)
        page.locator("#notice:has-text('FORBIDDEN')").wait_for(timeout=WAIT_MS)
        assert admin.status(host, region) == "ACTIVE"
        assert page.locator("#login").is_hidden()  # still signed in: the key may read
    finally:
        context.close()
