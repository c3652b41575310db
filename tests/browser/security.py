"""The console under a plain HTTP client that tries to break it: forged changes (no CSRF token, a
wrong one, a cross-site request, no session), markup in org names and page titles, another org's
ids in URLs, a signed-out or revoked session used again, and tokens looked for in every answer."""

import http.client
import json
import re
import sys
import urllib.parse

from common import (
    COLLECTOR,
    CONSENT,
    CONSOLE,
    LINKER,
    OPERATOR_TOKEN,
    now_ms,
    remember,
    rfc3339,
    rpc,
    wait_for,
)

HOST = urllib.parse.urlparse(CONSOLE).netloc
SEEN = []  # (what, status, headers, body) of every answer
SIGNED_IN = [OPERATOR_TOKEN]
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; connect-src 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def call(method: str, path: str, cookie: str | None = None, form: dict | None = None, headers=None):
    conn = http.client.HTTPConnection(HOST, timeout=30)
    sent = dict(headers or {})
    body = None
    if cookie:
        sent["Cookie"] = f"sightline_session={cookie}"
    if form is not None:
        body = urllib.parse.urlencode(form, doseq=True)
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=sent)
    r = conn.getresponse()
    text = r.read().decode()
    got = {k.lower(): v for k, v in r.getheaders()}
    cookies = [v for k, v in r.getheaders() if k.lower() == "set-cookie"]
    conn.close()
    SEEN.append((f"{method} {path}", r.status, got, text))
    for name, value in HEADERS.items():
        assert got.get(name) == value, f"{method} {path}: {name} is {got.get(name)!r}"
    return r.status, got, text, cookies


def sign_in(token: str) -> str:
    status, headers, _, cookies = call("POST", "/signin", form={"token": token})
    assert status == 303, status
    assert len(cookies) == 1, cookies
    parts = [p.strip() for p in cookies[0].split(";")]
    name, session = parts[0].split("=", 1)
    assert name == "sightline_session" and re.fullmatch(r"[0-9a-f]{64}", session), parts[0]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(parts[1:]), parts
    assert token not in cookies[0]
    return session


def csrf_of(path: str, session: str) -> str:
    status, _, body, _ = call("GET", path, session)
    assert status == 200, (path, status, body[:300])
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', body).group(1)


def org_count() -> int:
    return len(rpc(LINKER, OPERATOR_TOKEN, "sightline.linker.v1.LinkerService/ListOrgs", {})["orgs"])


def main() -> None:
    # Not signed in: every page sends to sign in; a bad token is refused without a session.
    status, headers, _, _ = call("GET", "/")
    assert status == 303 and headers["location"] == "/signin"
    status, headers, _, _ = call("GET", "/operator")
    assert status == 303 and headers["location"] == "/signin"
    status, _, body, cookies = call("POST", "/signin", form={"token": "sla_" + "x" * 43})
    assert status == 401 and not cookies and "not a valid token" in body, (status, body[:200])

    op = sign_in(OPERATOR_TOKEN)
    csrf = csrf_of("/operator", op)

    # Forged changes are refused and change nothing.
    before = org_count()
    forged = [
        ("no CSRF token", op, {"name": "Forged"}, {}),
        ("a wrong CSRF token", op, {"name": "Forged", "csrf": "0" * 64}, {}),
        ("another session's token", op, {"name": "Forged", "csrf": csrf[::-1]}, {}),
        ("a cross-site request", op, {"name": "Forged", "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}),
    ]
    for what, session, form, extra in forged:
        status, _, body, _ = call("POST", "/operator/orgs", session, form, extra)
        assert status == 403 and "Form refused" in body, (what, status)
    status, headers, _, _ = call("POST", "/operator/orgs", None, {"name": "Forged", "csrf": csrf})
    assert status == 303 and headers["location"] == "/signin", "no session"
    assert org_count() == before, "a forged change changed something"

    # Markup in an org's name is shown as text.
    markup = '<script>alert("org")</script><img src=x onerror=alert(1)>'
    status, headers, _, _ = call("POST", "/operator/orgs", op, {"name": markup, "csrf": csrf})
    assert status == 303, status
    org_a = headers["location"].rsplit("/", 1)[1]
    _, _, body, _ = call("GET", "/operator", op)
    assert "<script>alert" not in body and "<img src=x" not in body
    assert "&#60;script&#62;alert(&#34;org&#34;)&#60;/script&#62;" in body or "&lt;script&gt;" in body

    # Two orgs, each with an admin; B has an instance and a link key.
    org_b = rpc(LINKER, OPERATOR_TOKEN, "sightline.linker.v1.LinkerService/CreateOrg",
                {"name": "Bravo Secret Name"})["org"]["orgId"]
    admin = {}
    for org in (org_a, org_b):
        made = rpc(LINKER, OPERATOR_TOKEN, "sightline.linker.v1.LinkerService/CreateAdminToken",
                   {"orgId": org, "label": "t"})
        admin[org] = (remember("signin", made["secret"]), made["token"]["tokenId"])
        SIGNED_IN.append(made["secret"])
    key_b = rpc(LINKER, admin[org_b][0], "sightline.linker.v1.LinkerService/CreateLinkKey",
                {"orgId": org_b, "label": "b"})
    remember("issued", key_b["secret"])
    linked_b = rpc(LINKER, key_b["secret"], "sightline.linker.v1.LinkerService/LinkInstance",
                   {"metadata": {"serverId": "BRAVO-1", "baseUrl": "https://bravo.example", "product": "jira", "version": "9.12.4"}})
    remember("issued", linked_b["credential"])
    instance_b = linked_b["instance"]["instanceId"]

    # A's admin: B's ids in URLs give the service's refusal as a page, and reveal nothing.
    a = sign_in(admin[org_a][0])
    csrf_a = csrf_of(f"/orgs/{org_a}/consent", a)
    for path in [f"/orgs/{org_b}/consent", f"/orgs/{org_b}/sample", f"/orgs/{org_b}/instances",
                 f"/orgs/{org_b}/pages", f"/orgs/{org_b}/settings", f"/orgs/{org_b}/audit",
                 f"/orgs/{org_b}/instances/{instance_b}",
                 f"/orgs/{org_a}/instances/{instance_b}",
                 f"/orgs/{org_a}/pages/page?instance={instance_b}&page=p1",
                 "/operator", f"/operator/orgs/{org_b}", "/operator/services"]:
        status, _, body, _ = call("GET", path, a)
        assert status in (403, 404), (path, status)
        assert re.search(r'<span class="code">(PERMISSION_DENIED|NOT_FOUND)</span>', body), (path, body[:400])
        assert "Bravo Secret Name" not in body and "BRAVO-1" not in body, path
    keys_before = rpc(LINKER, admin[org_b][0], "sightline.linker.v1.LinkerService/ListLinkKeys",
                      {"orgId": org_b})["keys"]
    for path, form in [(f"/orgs/{org_b}/keys", {"label": "x"}),
                       (f"/orgs/{org_b}/instances/{instance_b}/unlink", {}),
                       (f"/orgs/{org_b}/consent", {"usage_level": "1", "sharing_level": "1",
                                                  "reason": "x", "expected_version": "0"})]:
        form["csrf"] = csrf_a
        status, _, body, _ = call("POST", path, a, form)
        assert status in (403, 404), (path, status, body[:300])
    keys_after = rpc(LINKER, admin[org_b][0], "sightline.linker.v1.LinkerService/ListLinkKeys",
                     {"orgId": org_b})["keys"]
    assert keys_after == keys_before
    listed_b = rpc(LINKER, admin[org_b][0], "sightline.linker.v1.LinkerService/ListInstances",
                   {"orgId": org_b})["instances"]
    assert listed_b[0]["state"] == "INSTANCE_STATE_LINKED"

    # Bad input gets the service's message next to the form.
    status, headers, _, _ = call("POST", f"/orgs/{org_a}/consent", a, {
        "usage_level": "3", "sharing_level": "2", "reason": "x" * 600, "expected_version": "0",
        "csrf": csrf_a})
    assert status == 303
    _, _, body, _ = call("GET", headers["location"], a)
    assert re.search(r'class="error" role="alert">reason: [^<]*500', body), body[:2000]

    # A page title holding markup, stored under Extended sharing, is shown as text.
    rpc(CONSENT, admin[org_a][0], "sightline.consent.v1.ConsentService/UpdateConsent", {
        "orgId": org_a, "reason": "extended",
        "settings": {"usageLevel": "USAGE_LEVEL_ADVANCED", "sharingLevel": "SHARING_LEVEL_EXTENDED"}})
    rpc(CONSENT, admin[org_a][0], "sightline.consent.v1.ConsentService/UpdateTrackingSettings", {
        "orgId": org_a, "settings": {"enabledChannels": ["CHANNEL_DESKTOP"]}})
    key_a = rpc(LINKER, admin[org_a][0], "sightline.linker.v1.LinkerService/CreateLinkKey",
                {"orgId": org_a, "label": "a"})
    remember("issued", key_a["secret"])
    linked_a = rpc(LINKER, key_a["secret"], "sightline.linker.v1.LinkerService/LinkInstance",
                   {"metadata": {"serverId": "ALPHA-1", "baseUrl": "https://alpha.example", "product": "confluence", "version": "8.5.1"}})
    credential_a = remember("issued", linked_a["credential"])
    title = '<script>alert("title")</script>Plan'

    def ingest():
        return rpc(COLLECTOR, credential_a, "sightline.collector.v1.CollectorService/Ingest", {
            "events": [{"eventId": "t1", "occurredAt": rfc3339(now_ms() - 1000),
                        "pageView": {"pageId": "p1", "spaceId": "s1", "pageTitle": title,
                                     "viewerId": "u1", "channel": "CHANNEL_DESKTOP"}}]})

    # The collector may hold the new policy a moment after the change: retry until it is stored.
    wait_for("the page view to be accepted", 60, lambda: ingest()["result"]["accepted"] == 1)
    _, _, body, _ = call("GET", f"/orgs/{org_a}/sample", a)
    assert "<script>alert(&#34;title" not in body and '<script>alert("title")' not in body
    assert "&#60;script&#62;alert(&#34;title&#34;)&#60;/script&#62;Plan" in body, \
        re.findall(r"page_title</dt><dd>[^<]*", body)

    # A large upload (3 MB, over axum's default body limit) reaches insights-svc, whose refusal of
    # what is not an assessment is shown next to the upload form.
    instance_a = linked_a["instance"]["instanceId"]
    boundary = "sightlineboundary7f3a"
    junk = b"x" * (3 << 20)
    payload = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.json\"\r\n"
        "Content-Type: application/json\r\n\r\n"
    ).encode() + junk + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection(HOST, timeout=60)
    conn.request("POST", f"/orgs/{org_a}/instances/{instance_a}/assessment?csrf={csrf_a}",
                 body=payload, headers={"Cookie": f"sightline_session={a}",
                                        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 303, r.status
    back = r.getheader("location")
    conn.close()
    _, _, body, _ = call("GET", back, a)
    assert re.search(r'class="error" role="alert">[^<]*(parse|JSON|json)', body), \
        re.findall(r'class="(?:error|notice)"[^>]*>[^<]*', body)

    # Signing out ends the session; the same cookie opens nothing afterwards.
    status, headers, _, cookies = call("POST", "/signout", a, {"csrf": csrf_a})
    assert status == 303 and headers["location"] == "/signin"
    assert cookies and "Max-Age=0" in cookies[0]
    status, headers, _, _ = call("GET", f"/orgs/{org_a}/consent", a)
    assert status == 303 and headers["location"] == "/signin"

    # A token revoked while its session lives: the next page ends it.
    b = sign_in(admin[org_b][0])
    rpc(LINKER, OPERATOR_TOKEN, "sightline.linker.v1.LinkerService/RevokeAdminToken",
        {"orgId": org_b, "tokenId": admin[org_b][1]})

    def ended():
        status, headers, _, _ = call("GET", f"/orgs/{org_b}/consent", b)
        return status == 303 and headers["location"] == "/signin?ended=1"

    # linker-svc's answer may be cached by the services for a moment.
    wait_for("a revoked token's session to end", 60, ended)

    # No signed-in token in any answer, body or header.
    for what, _, headers, body in SEEN:
        for token in SIGNED_IN:
            assert token not in body, f"a token in the body of {what}"
            assert token not in json.dumps(headers), f"a token in the headers of {what}"
    print(f"checked {len(SEEN)} answers")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        raise
