"""The console in a real browser (Debian's Chromium, headless, driven by Playwright), against the
real stack as processes: the operator creates an org and its admin token; the admin opts in, sees
what the policy does to each field, makes a link key that is shown once, links a companion from the
command line and sees its health, trends and page report equal the services' own answers, moves
the org's data and watches the move finish, opts out, and verifies the audit chain. Every page is
screenshotted, checked with axe-core (no serious or critical violation) and walked with the
keyboard alone."""

import json
import os
import pathlib
import re
import stat
import subprocess
import sys

from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect, sync_playwright

from common import (
    COLLECTOR,
    CONSENT,
    CONSOLE,
    INSIGHTS,
    LINKER,
    OPERATOR_TOKEN,
    SHOTS,
    WORK,
    day_range,
    now_ms,
    remember,
    rfc3339,
    rpc,
    wait_for,
)

HOUR_MS = 3_600_000
# Generous bounds: a busy machine makes pages slow, never wrong (these are not speed checks).
expect.set_options(timeout=30_000)
# axe-core from the npm registry (scripts/test installs it under .tools/), else the copy the Python
# wrapper ships.
_AXE_CORE = pathlib.Path(__file__).parents[2] / ".tools/node_modules/axe-core/axe.min.js"
AXE = Axe(_AXE_CORE.read_text()) if _AXE_CORE.exists() else Axe()
CHECKED: list[str] = []
RESPONSES = []


def check_page(page, name: str) -> None:
    """Screenshot, axe-core and the keyboard: every focusable control is reached by Tab alone."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    results = AXE.run(page)
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{name}: axe-core found {bad}"
    # Mark every visible control, then Tab through the page and see which were reached.
    total = page.evaluate(
        """() => {
        const controls = [...document.querySelectorAll(
            'a[href], button, input:not([type=hidden]), select, textarea, summary')]
            .filter(e => e.getClientRects().length > 0 && !e.disabled);
        controls.forEach((e, i) => e.setAttribute('data-kb', String(i)));
        return controls.length;
    }"""
    )
    page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
    reached = set()
    for _ in range(total * 2 + 5):
        page.keyboard.press("Tab")
        kb = page.evaluate("() => document.activeElement && document.activeElement.getAttribute('data-kb')")
        if kb is not None:
            reached.add(int(kb))
        if len(reached) == total:
            break
    missing = sorted(set(range(total)) - reached)
    assert not missing, f"{name}: {len(missing)} of {total} controls not reachable by keyboard"
    CHECKED.append(name)


def no_dialogs(page) -> None:
    def refuse(dialog):
        dialog.dismiss()
        raise AssertionError(f"a script ran in the page: dialog {dialog.message!r}")

    page.on("dialog", refuse)


def sign_in_with_keyboard(page, token: str) -> None:
    page.goto(f"{CONSOLE}/")
    expect(page).to_have_url(f"{CONSOLE}/signin")
    page.focus("#token")
    page.keyboard.type(token)
    page.keyboard.press("Enter")


def text(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def main() -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        operator_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        operator_ctx.set_default_timeout(60_000)
        operator_ctx.on("response", lambda r: RESPONSES.append(r))
        op = operator_ctx.new_page()
        no_dialogs(op)

        # The operator signs in (keyboard only) and creates an org whose name is markup.
        sign_in_with_keyboard(op, OPERATOR_TOKEN)
        expect(op).to_have_url(f"{CONSOLE}/operator")
        org_name = '<script>alert("org")</script> Acme'
        op.fill("#org-name", org_name)
        op.get_by_role("button", name="Create org").click()
        expect(op).to_have_url(re.compile(r"/operator/orgs/[0-9a-f-]{36}$"))
        org_id = op.url.rsplit("/", 1)[1]
        op.fill("#token-label", "first admin")
        op.get_by_role("button", name="Create admin token").click()
        admin_token = remember("issued", text(op, "#new-secret"))
        assert admin_token.startswith("sla_"), admin_token
        check_page(op, "operator-org")
        op.reload()
        assert op.locator("#new-secret").count() == 0, "a secret is shown once"
        op.goto(f"{CONSOLE}/operator")
        expect(op.get_by_role("cell", name=org_name, exact=True)).to_be_visible()
        check_page(op, "operator-orgs")
        op.goto(f"{CONSOLE}/operator/services")
        expect(op.locator("td.ok")).to_have_count(4)
        check_page(op, "operator-services")
        remember("signin", admin_token)

        # The org's admin signs in on a browser of their own.
        admin_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        admin_ctx.set_default_timeout(60_000)
        admin_ctx.on("response", lambda r: RESPONSES.append(r))
        page = admin_ctx.new_page()
        no_dialogs(page)
        sign_in_with_keyboard(page, admin_token)
        expect(page).to_have_url(f"{CONSOLE}/orgs/{org_id}/consent")
        assert text(page, "#usage-level") == "DISABLED"

        # Opt in: Advanced usage, Basic sharing.
        page.select_option("#usage_level", "3")
        page.select_option("#sharing_level", "1")
        page.fill("#reason", "Opting in to usage data sharing")
        page.get_by_role("button", name="Save").click()
        expect(page.locator("#usage-level")).to_have_text("ADVANCED")
        expect(page.locator("#history tbody tr").first.locator("td").last).to_have_text("valid")
        check_page(page, "consent")

        # View tracking on for desktop views.
        page.goto(f"{CONSOLE}/orgs/{org_id}/settings")
        page.check("#channel-1")
        page.get_by_role("button", name="Save view tracking").click()
        expect(page.get_by_text("View tracking saved.")).to_be_visible()

        # Sample data: the e-mail address is dropped, the viewer's id hashed.
        page.goto(f"{CONSOLE}/orgs/{org_id}/sample")
        mark = lambda field: page.locator(f'tr[data-field="{field}"] td.mark')
        expect(mark("page_view.viewer_email")).to_have_text("dropped")
        expect(mark("page_view.viewer_id")).to_have_text("hashed")
        expect(mark("page_view.client_ip")).to_have_text("dropped")
        check_page(page, "sample")

        # A link key, shown once.
        page.goto(f"{CONSOLE}/orgs/{org_id}/instances")
        page.fill("#key-label", "companion")
        page.get_by_role("button", name="Create link key").click()
        link_key = remember("issued", text(page, "#new-secret"))
        assert link_key.startswith("slk_"), link_key
        check_page(page, "link-key")
        page.reload()
        assert page.locator("#new-secret").count() == 0, "a secret is shown once"

        # The companion links from the command line and sends 24 hours of CPU load at 95 %.
        home = WORK / "companion"
        home.mkdir(mode=0o700, exist_ok=True)
        home.chmod(0o700)
        key_file = home / "link.key"
        key_file.write_text(link_key)
        key_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
        companion = [os.environ["COMPANION"], "--home", str(home)]
        linked = subprocess.run(
            companion
            + [
                "link",
                "--key-file", str(key_file),
                "--server-id", "BQXJ-7Y2K",
                "--base-url", "https://jira.acme.example",
                "--product", "jira",
                "--product-version", "9.12.4",
                "--linker", f"http://{LINKER}",
                "--consent", f"http://{CONSENT}",
                "--collector", f"http://{COLLECTOR}",
                "--insights", f"http://{INSIGHTS}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert linked.returncode == 0, linked.stdout + linked.stderr
        key_file.unlink()
        instance_id = json.loads((home / "companion.json").read_text())["instance_id"]
        now = now_ms()
        hour = now - now % HOUR_MS
        inbox = home / "inbox"
        inbox.mkdir(exist_ok=True)
        lines = [
            json.dumps({"name": "jvm.cpu.load", "value": 95.0, "unit": "percent",
                        "at": rfc3339(hour - h * HOUR_MS + 60_000), "tags": {"node": "n1"}})
            for h in range(2, 26)
        ]
        (inbox / "product.jsonl.tmp").write_text("\n".join(lines) + "\n")
        (inbox / "product.jsonl.tmp").rename(inbox / "product.jsonl")
        run = subprocess.Popen(
            companion + ["run", "--sample-every-ms", "200", "--upload-every-ms", "300",
                         "--guardrails-every-ms", "1000", "--max-backoff-ms", "500"],
            stdout=subprocess.DEVNULL,
            stderr=open(WORK / "companion-run.log", "ab"),
        )
        try:
            health_req = {"orgId": org_id, "instanceId": instance_id}
            wait_for("a cpu-load-high finding", 90, lambda: any(
                f["ruleId"] == "cpu-load-high"
                for f in rpc(INSIGHTS, admin_token, "sightline.insights.v1.InsightsService/GetHealth",
                             health_req)["health"]["findings"]))

            # The instance appears in the portfolio; its page shows the finding and the trend.
            page.goto(f"{CONSOLE}/orgs/{org_id}/instances")
            expect(page.locator(f'#portfolio tr[data-instance="{instance_id}"]')).to_be_visible()
            check_page(page, "instances")
            page.get_by_role("link", name=instance_id).click()
            expect(page).to_have_url(f"{CONSOLE}/orgs/{org_id}/instances/{instance_id}")
            expect(page.locator(".finding").first).to_be_visible()
            figure = page.locator('figure[data-metric="jvm.cpu.load"]')
            expect(figure.locator("svg.chart circle")).not_to_have_count(0)
            trends = page.locator("#trends")
            start_ms = int(trends.get_attribute("data-start-ms"))
            end_ms = int(trends.get_attribute("data-end-ms"))
            answer = rpc(INSIGHTS, admin_token, "sightline.insights.v1.InsightsService/GetTrends", {
                "orgId": org_id, "instanceId": instance_id, "metricName": "jvm.cpu.load",
                "range": {"start": rfc3339(start_ms), "end": rfc3339(end_ms)}, "bucket": "3600s"})
            shown = [float(v) for v in figure.locator("table.points td.value").all_text_contents()]
            wanted = [float(p["value"]) for p in answer["points"]]
            assert shown == wanted and len(shown) >= 24, (shown, wanted)
            assert figure.locator("svg.chart circle").count() == len(wanted)
            # An assessment file from the browser, streamed to UploadAssessment.
            page.set_input_files("#file", os.environ["ASSESSMENT"])
            page.get_by_role("button", name="Upload").click()
            expect(page.get_by_text(re.compile(r"Uploaded \d+ bytes: readiness score \d+"))).to_be_visible()
            expect(page.locator("#readiness-score")).to_be_visible()
            check_page(page, "health")
        finally:
            run.terminate()
            run.wait(timeout=30)

        # Page views from a second instance, sent as an instance would.
        key2 = rpc(LINKER, admin_token, "sightline.linker.v1.LinkerService/CreateLinkKey",
                   {"orgId": org_id, "label": "wiki"})
        remember("issued", key2["secret"])
        wiki = rpc(LINKER, key2["secret"], "sightline.linker.v1.LinkerService/LinkInstance",
                   {"metadata": {"serverId": "WIKI-1", "baseUrl": "https://wiki.acme.example",
                                 "product": "confluence", "version": "8.5.1"}})
        credential = remember("issued", wiki["credential"])
        wiki_id = wiki["instance"]["instanceId"]
        at = rfc3339(now_ms() - 60_000)
        views = [("pv1", "p1", "u1"), ("pv2", "p1", "u2"), ("pv3", "p1", "u3"),
                 ("pv4", "p2", "u1"), ("pv5", "p2", "u4")]
        ingested = rpc(COLLECTOR, credential, "sightline.collector.v1.CollectorService/Ingest", {
            "events": [{"eventId": e, "occurredAt": at,
                        "pageView": {"pageId": pg, "spaceId": "s1", "viewerId": v,
                                     "viewerEmail": f"{v}@acme.example", "channel": "CHANNEL_DESKTOP"}}
                       for (e, pg, v) in views]})
        assert ingested["result"]["accepted"] == len(views), ingested

        page.goto(f"{CONSOLE}/orgs/{org_id}/pages")
        days = (page.input_value("#from"), page.input_value("#to"))
        global_report = rpc(COLLECTOR, admin_token,
                            "sightline.collector.v1.CollectorService/GetGlobalReport",
                            {"orgId": org_id, "range": day_range(*days)})
        assert int(text(page, "#views")) == int(global_report["stats"]["views"]) == 5
        assert int(text(page, "#unique-viewers")) == int(global_report["stats"]["uniqueViewers"])
        check_page(page, "page-analytics")
        page.get_by_role("link", name=f"space s1 on {wiki_id}").click()
        check_page(page, "page-analytics-space")
        page.get_by_role("link", name="page p1").click()
        page_report = rpc(COLLECTOR, admin_token,
                          "sightline.collector.v1.CollectorService/GetPageReport",
                          {"orgId": org_id, "instanceId": wiki_id, "pageId": "p1",
                           "range": day_range(*days)})
        assert int(text(page, "#views")) == int(page_report["stats"]["views"]) == 3
        assert int(text(page, "#unique-viewers")) == int(page_report["stats"]["uniqueViewers"]) == 3
        check_page(page, "page-analytics-page")

        # Sample data now shows the stored records: the e-mail address is nowhere.
        page.goto(f"{CONSOLE}/orgs/{org_id}/sample")
        expect(page.locator("#records tbody tr").first).to_be_visible()
        assert "@acme.example" not in page.content()

        # Residency: the admin asks for the EU, the operator starts the move, the services move
        # the data and the admin's page follows the move to DONE by itself.
        page.goto(f"{CONSOLE}/orgs/{org_id}/settings")
        page.select_option("#scope", "1")
        page.select_option("#to_location", "4")
        page.get_by_role("button", name="Request move").click()
        expect(page.locator("td.move-state").first).to_have_text("REQUESTED")
        op.goto(f"{CONSOLE}/operator/orgs/{org_id}")
        op.get_by_role("button", name="Start move").click()
        expect(op.get_by_text("Move started.")).to_be_visible()
        expect(page.locator("td.move-state").first).to_have_text("DONE", timeout=90_000)
        expect(page.locator("#location")).to_have_text("EU")
        check_page(page, "settings")

        # Opt out.
        page.goto(f"{CONSOLE}/orgs/{org_id}/consent")
        page.select_option("#usage_level", "1")
        page.fill("#reason", "Opting out")
        page.get_by_role("button", name="Save").click()
        expect(page.locator("#usage-level")).to_have_text("DISABLED")

        # The audit log lists what was done, and the chain verifies.
        page.goto(f"{CONSOLE}/orgs/{org_id}/audit")
        actions = set(page.locator("td.action").all_inner_texts())
        for action in ["org.created", "admin_token.created", "consent.updated", "tracking.updated",
                       "link_key.created", "instance.linked", "residency.move_requested",
                       "residency.move_started"]:
            assert action in actions, (action, sorted(actions))
        page.get_by_role("button", name="Verify chain").click()
        expect(page.get_by_text(re.compile(r"The chain is intact: \d+ entries checked"))).to_be_visible()
        check_page(page, "audit")

        # Signing out ends the session: its cookie, put back, opens nothing.
        cookie = next(c for c in admin_ctx.cookies() if c["name"] == "sightline_session")
        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(f"{CONSOLE}/signin")
        check_page(page, "signin")
        admin_ctx.add_cookies([cookie])
        page.goto(f"{CONSOLE}/orgs/{org_id}/consent")
        expect(page).to_have_url(f"{CONSOLE}/signin")

        # No signed-in token in any response's body or headers.
        for response in RESPONSES:
            body = ""
            try:
                body = response.text()
            except Exception:  # a redirect has no body to read
                pass
            headers = json.dumps(response.headers)
            for token in (OPERATOR_TOKEN, admin_token):
                assert token not in body, f"a token in the body of {response.url}"
                assert token not in headers, f"a token in the headers of {response.url}"
        assert len(RESPONSES) > 50, len(RESPONSES)
        browser.close()
    print(f"checked {len(CHECKED)} pages: {', '.join(CHECKED)}")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        raise
