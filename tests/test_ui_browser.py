"""The web UI in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright)
against a real gateway process: sign in, the tenant dropdown, switching tenant, upload,
download, delete, Administration -> Tenants -> Create, and a hostile file name.

One browser and one gateway for the module; each test has its own browser context (its own
cookies). The screenshots the README shows are written to ``docs/screenshots/`` on the way.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, expect, sync_playwright

from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

CHROMIUM: Final = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
# The README's screenshots are rewritten only when asked (UPDATE_SCREENSHOTS=1): a plain run
# takes them all the same, into a temporary folder, and leaves the work tree as it was.
DOCS_SCREENSHOTS: Final = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
ROOT_PASSWORD: Final = "root password for tests"
ALICE_PASSWORD: Final = "alice password 123"
HOSTILE: Final = "<img src=x onerror=alert(1)>.txt"
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ROOT: Final = _basic("root", ROOT_PASSWORD)
ALICE: Final = _basic("alice", ALICE_PASSWORD)


def call(
    url: str,
    method: str = "GET",
    auth: str = ROOT,
    body: Any = None,
    data: bytes | None = None,
    cookie: str | None = None,
    content_type: str | None = None,
) -> tuple[int, bytes]:
    headers = {"Authorization": auth} if auth else {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if cookie is not None:
        headers["Cookie"] = f"gateway_session={cookie}"
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data = tmp_path_factory.mktemp("ui")
    config = {
        "storage.type": "local",
        "storage.local.base-path": str(data / "data"),
        "tenants.enabled": True,
        "tenants.default-tenant": False,
        "tenants.ids": ["acme", "beta", "gamma"],
        "admin.username": "root",
        "admin.password": ROOT_PASSWORD,
        "admin.password-file": str(data / "admin.txt"),
    }
    with GatewayProcess(config) as process:
        url = process.url
        assert url is not None
        user = {"username": "alice", "password": ALICE_PASSWORD, "canCreateTenants": True}
        assert call(f"{url}/api/v1/users", "POST", body=user)[0] == 201
        bob = {"username": "bob", "password": "bob password 123"}
        assert call(f"{url}/api/v1/users", "POST", body=bob)[0] == 201
        for tenant in ("acme", "beta"):
            binding = {"tenant": tenant, "kind": "user", "subject": "alice", "role": "EDITOR"}
            assert call(f"{url}/api/v1/bindings", "PUT", body=binding)[0] == 200
        for key, tenant in (("reports/q1.csv", "acme"), ("beta-only.txt", "beta")):
            status, _ = call(f"{url}/api/v1/{tenant}/files/{key}", "PUT", ALICE, data=b"a,b\n1,2\n")
            assert status == 201
        yield process
        assert "Traceback" not in process.log_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Debian's chromium: Playwright never downloads a browser here.
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1200, "height": 720}, accept_downloads=True)
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


def sign_in(page: Page, url: str, user: str = "alice", password: str = ALICE_PASSWORD) -> None:
    page.goto(f"{url}/ui/")
    page.fill("#sign-in input[name=username]", user)
    page.fill("#sign-in input[name=password]", password)
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#header")).to_be_visible()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


def shot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / name))
    assert (folder / name).read_bytes().startswith(b"\x89PNG")


def test_sign_in_dropdown_lists_only_the_users_tenants_and_switching_changes_url_and_listing(
    gateway: GatewayProcess, context: BrowserContext, screenshots: Path
) -> None:
    page = context.new_page()
    page.goto(f"{gateway.url}/ui/")
    expect(page.locator("#sign-in")).to_be_visible()
    page.fill("#sign-in input[name=username]", "alice")
    page.fill("#sign-in input[name=password]", "wrong password")
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#sign-in-error")).to_have_text("wrong username or password")

    sign_in(page, str(gateway.url))
    expect(page).to_have_url(f"{gateway.url}/ui/acme/files/")
    expect(page.locator("#listing")).to_contain_text("reports/")
    cookie = next(c for c in context.cookies() if c["name"] == "gateway_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]

    page.click("#tenant-button")
    options = page.locator("#tenant-menu [role=option]")
    expect(options).to_have_count(2)  # not gamma: alice has no role there
    assert [o.get_attribute("data-tenant") for o in options.all()] == ["acme", "beta"]
    shot(page, screenshots, "tenant-dropdown.png")

    page.click("#tenant-menu [data-tenant=beta] a")
    expect(page).to_have_url(f"{gateway.url}/ui/beta/files/")
    expect(page.locator("#listing")).to_contain_text("beta-only.txt")
    expect(page.locator("#listing")).not_to_contain_text("reports/")
    expect(page.locator("#tenant-current")).to_have_text("beta")

    # The tenant in the URL is the page: a reload or a pasted link opens the same listing.
    page.goto(f"{gateway.url}/ui/acme/files/reports/")
    expect(page.locator("#listing")).to_contain_text("q1.csv")
    expect(page.locator(".breadcrumbs")).to_have_text("acme/reports")

    # Pages of a folder: two entries a page here (?limit=2), Next and Previous.
    for name in ("q2.csv", "q3.csv"):
        assert (
            call(f"{gateway.url}/api/v1/acme/files/reports/{name}", "PUT", ALICE, data=b"x")[0]
            == 201
        )
    page.goto(f"{gateway.url}/ui/acme/files/reports/?limit=2")
    rows = page.locator("#listing tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#page-previous")).to_be_disabled()
    page.click("#page-next")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("q3.csv")
    expect(page.locator("#page-next")).to_be_disabled()
    page.click("#page-previous")
    expect(rows).to_have_count(2)
    expect(page.locator("#listing")).to_contain_text("q1.csv")
    page.click(".breadcrumbs a")  # back to the tenant's root
    expect(page).to_have_url(f"{gateway.url}/ui/acme/files/")


def test_upload_download_preview_and_delete_a_file(
    gateway: GatewayProcess, context: BrowserContext, tmp_path: Path, screenshots: Path
) -> None:
    page = context.new_page()
    sign_in(page, str(gateway.url))
    expect(page.locator("#listing")).to_contain_text("reports/")
    source = tmp_path / "notes from the browser.txt"
    content = b"line one\nline two: uploaded by the browser test\n"
    source.write_bytes(content)
    page.set_input_files("#upload-input", str(source))
    row = page.locator("#listing tr[data-key='notes from the browser.txt']")
    expect(row).to_contain_text(f"{len(content)} B")
    expect(page.locator("#uploads")).to_contain_text("uploaded")
    stored = call(f"{gateway.url}/api/v1/acme/files/notes%20from%20the%20browser.txt", auth=ALICE)
    assert stored == (200, content)

    # Drag and drop: a drop event carrying a file, as a person's drag would deliver it.
    page.evaluate(
        """() => {
            const data = new DataTransfer();
            data.items.add(new File(["dropped"], "dropped.txt", {type: "text/plain"}));
            document.getElementById("drop-zone")
                .dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        }"""
    )
    expect(page.locator("#listing tr[data-key='dropped.txt']")).to_contain_text("7 B")
    shot(page, screenshots, "file-listing.png")

    # New folder, then move a file into it (both through the page's dialog).
    page.click("#new-folder")
    page.fill("#dialog-input", "archive")
    page.click("#dialog-ok")
    expect(page.locator("#listing tr[data-key='archive'] a.dir")).to_have_text("archive/")
    page.locator("#listing tr[data-key='dropped.txt'] button.rename").click()
    expect(page.locator("#dialog-input")).to_have_value("dropped.txt")
    page.fill("#dialog-input", "archive/dropped.txt")
    page.click("#dialog-ok")
    expect(page.locator("#listing tr[data-key='dropped.txt']")).to_have_count(0)
    assert call(f"{gateway.url}/api/v1/acme/files/archive/dropped.txt", auth=ALICE) == (
        200,
        b"dropped",
    )

    row.locator("button.file").click()
    expect(page.locator("#preview-text")).to_have_text(content.decode())
    uri = "kestra:///notes%20from%20the%20browser.txt"
    expect(page.locator("#preview-uri")).to_have_value(uri)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=str(gateway.url))
    page.locator("#preview").get_by_role("button", name="Copy").click()
    expect(page.locator("#status")).to_have_text(f"Copied {uri}")
    assert page.evaluate("() => navigator.clipboard.readText()") == uri

    with page.expect_download() as info:
        row.locator("a.download").click()
    download = info.value
    assert download.suggested_filename == "notes from the browser.txt"
    assert Path(download.path()).read_bytes() == content

    row.locator("button.delete").click()
    expect(page.locator("#dialog")).to_be_visible()
    expect(page.locator("#dialog-message")).to_have_text("Delete “notes from the browser.txt”?")
    page.click("#dialog-ok")
    expect(row).to_have_count(0)
    assert (
        call(f"{gateway.url}/api/v1/acme/stats/notes%20from%20the%20browser.txt", auth=ALICE)[0]
        == 404
    )


def test_create_a_tenant_from_administration_tenants(
    gateway: GatewayProcess, context: BrowserContext, screenshots: Path
) -> None:
    page = context.new_page()
    sign_in(page, str(gateway.url))
    page.click("#admin-button")
    page.click("#nav-tenants")
    expect(page).to_have_url(f"{gateway.url}/ui/acme/admin/tenants")
    expect(page.locator("#tenants")).to_contain_text("acme")
    page.click("#create-tenant-button")
    page.fill("#create-tenant input[name=id]", "stage")
    page.fill("#create-tenant input[name=name]", "Staging")
    shot(page, screenshots, "create-tenant.png")
    page.click("#create-tenant-submit")
    expect(page.locator("#tenant-notice")).to_have_text(
        "Tenant stage created. You have the Admin role on it."
    )
    expect(page.locator("#tenants tr[data-tenant=stage]")).to_contain_text("Staging")
    page.click("#tenant-button")
    expect(page.locator("#tenant-menu [data-tenant=stage]")).to_be_visible()
    status, body = call(f"{gateway.url}/api/v1/me", auth=ALICE)
    roles = {b["tenant"]: b["role"] for b in json.loads(body)["bindings"]}
    assert status == 200 and roles["stage"] == "ADMIN"

    # Administration -> Members of the new tenant, for its admin: grant bob a role.
    page.click("#tenant-menu [data-tenant=stage] a")
    page.click("#admin-button")
    page.click("#nav-members")
    expect(page).to_have_url(f"{gateway.url}/ui/stage/admin/members")
    expect(page.locator("#members")).to_contain_text("alice")
    page.fill("#grant input[name=subject]", "bob")
    page.select_option("#grant select[name=role]", "VIEWER")
    page.click("#grant button[type=submit]")
    expect(page.locator("#members")).to_contain_text("bob")
    status, body = call(f"{gateway.url}/api/v1/me", auth=_basic("bob", "bob password 123"))
    assert [(b["tenant"], b["role"]) for b in json.loads(body)["bindings"]] == [("stage", "VIEWER")]


def test_a_super_admin_soft_deletes_and_restores_a_tenant(
    gateway: GatewayProcess, context: BrowserContext
) -> None:
    page = context.new_page()
    sign_in(page, str(gateway.url), "root", ROOT_PASSWORD)
    # No role on any tenant's files: nothing in the dropdown, Administration still there.
    expect(page.locator("#main")).to_contain_text("no access to any tenant")
    page.click("#admin-button")
    page.click("#nav-tenants")
    row = page.locator("#tenants tr[data-tenant=gamma]")
    expect(row).to_contain_text("active")
    row.get_by_role("button", name="Delete").click()
    page.click("#dialog-ok")
    expect(row).to_contain_text("deleted")
    assert json.loads(call(f"{gateway.url}/api/v1/tenants/gamma")[1])["deleted"] is True
    row.get_by_role("button", name="Restore").click()
    expect(row).to_contain_text("active")
    assert json.loads(call(f"{gateway.url}/api/v1/tenants/gamma")[1])["deleted"] is False


def test_a_hostile_file_name_is_shown_as_text_and_runs_no_script(
    gateway: GatewayProcess, context: BrowserContext
) -> None:
    key = urllib.parse.quote(HOSTILE, safe="")
    status, _ = call(f"{gateway.url}/api/v1/acme/files/{key}", "PUT", ALICE, data=b"<b>x</b>")
    assert status == 201
    page = context.new_page()
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    sign_in(page, str(gateway.url))
    name = page.locator("#listing button.file", has_text="onerror")
    expect(name).to_have_text(HOSTILE)
    name.click()
    expect(page.locator("#preview h2")).to_have_text(HOSTILE)
    expect(page.locator("#preview-text")).to_have_text("<b>x</b>")
    assert page.locator("#main img").count() == 0
    assert page.locator("#main b").count() == 0
    page.wait_for_timeout(300)  # an onerror would have fired by now
    assert dialogs == []


def test_session_cookie_needs_the_csrf_token_to_change_anything_and_sign_out_ends_it(
    gateway: GatewayProcess, context: BrowserContext
) -> None:
    page = context.new_page()
    sign_in(page, str(gateway.url))
    # The page's cookie, without the token: refused, nothing written.
    refused = page.request.put(f"{gateway.url}/api/v1/acme/files/csrf.txt", data=b"x")
    assert refused.status == 403
    assert refused.json()["error"] == "csrf_token_required"
    assert call(f"{gateway.url}/api/v1/acme/stats/csrf.txt", auth=ALICE)[0] == 404
    # Reading needs no token.
    assert page.request.get(f"{gateway.url}/api/v1/acme/list").status == 200
    session = next(c["value"] for c in context.cookies() if c["name"] == "gateway_session")
    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#sign-in-error")).to_have_text("Signed out.")
    assert not [c for c in context.cookies() if c["name"] == "gateway_session"]
    # The old cookie, sent again by hand: the session is gone from the store.
    status, body = call(f"{gateway.url}/api/v1/acme/list", auth="", cookie=session)
    assert status == 401 and b"sign in again" in body
    page.goto(f"{gateway.url}/ui/acme/files/")
    expect(page.locator("#sign-in")).to_be_visible()


def test_an_image_is_previewed_from_a_blob(
    gateway: GatewayProcess, context: BrowserContext
) -> None:
    page = context.new_page()
    sign_in(page, str(gateway.url))
    png = page.screenshot(clip={"x": 0, "y": 0, "width": 40, "height": 30})
    status, _ = call(
        f"{gateway.url}/api/v1/beta/files/pictures/shot.png", "PUT", ALICE, data=png,
        content_type="image/png",
    )  # fmt: skip
    assert status == 201
    page.goto(f"{gateway.url}/ui/beta/files/pictures/")
    page.locator("#listing button.file", has_text="shot.png").click()
    image = page.locator("#preview img")
    expect(image).to_have_attribute("src", re.compile(r"^blob:"))
    page.wait_for_function("() => document.querySelector('#preview img').naturalWidth > 0")
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [40, 30]


def test_the_null_tenant_is_in_the_dropdown_where_it_is_served(
    tmp_path: Path, browser: Browser
) -> None:
    config = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "tenants.enabled": True,
        "tenants.default-tenant": True,
        "tenants.ids": ["acme"],
        "admin.username": "root",
        "admin.password": ROOT_PASSWORD,
        "admin.password-file": str(tmp_path / "admin.txt"),
    }
    with GatewayProcess(config) as process:
        url = str(process.url)
        user = {"username": "alice", "password": ALICE_PASSWORD}
        assert call(f"{url}/api/v1/users", "POST", body=user)[0] == 201
        for tenant in (None, "acme"):
            binding = {"tenant": tenant, "kind": "user", "subject": "alice", "role": "EDITOR"}
            assert call(f"{url}/api/v1/bindings", "PUT", body=binding)[0] == 200
        assert call(f"{url}/api/v1/files/root-file.txt", "PUT", ALICE, data=b"n")[0] == 201
        assert call(f"{url}/api/v1/acme/files/acme-file.txt", "PUT", ALICE, data=b"a")[0] == 201
        ctx = browser.new_context()
        try:
            page = ctx.new_page()
            sign_in(page, url)
            expect(page).to_have_url(f"{url}/ui/default/files/")
            page.click("#tenant-button")
            options = page.locator("#tenant-menu [role=option]")
            assert [o.get_attribute("data-tenant") for o in options.all()] == ["default", "acme"]
            expect(options.first).to_have_text("Default tenant")
            listing = page.locator("#listing")
            expect(listing).to_contain_text("root-file.txt")
            # The null tenant's root holds every tenant's folder: none of it shows.
            expect(listing).not_to_contain_text("tenants")
            expect(listing).not_to_contain_text(".gateway")
            page.click("#tenant-menu [data-tenant=acme] a")
            expect(page).to_have_url(f"{url}/ui/acme/files/")
            expect(listing).to_contain_text("acme-file.txt")
            expect(listing).not_to_contain_text("root-file.txt")
        finally:
            ctx.close()
