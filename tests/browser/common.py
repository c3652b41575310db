"""What the console's browser and HTTP tests share: the stack's addresses (from the environment the
Rust harness in tests/tests/console.rs sets), grpcurl for the services' own answers, and the record
of every secret seen, which the harness then looks for in the stack's log."""

import datetime
import json
import os
import pathlib
import subprocess
import time

ENV = os.environ
CONSOLE = ENV["CONSOLE_URL"].rstrip("/")
LINKER = ENV["LINKER_ADDR"]
CONSENT = ENV["CONSENT_ADDR"]
COLLECTOR = ENV["COLLECTOR_ADDR"]
INSIGHTS = ENV["INSIGHTS_ADDR"]
WORK = pathlib.Path(ENV["WORK"])
SHOTS = pathlib.Path(ENV["SCREENSHOTS"])
OPERATOR_TOKEN = pathlib.Path(ENV["OPERATOR_TOKEN_FILE"]).read_text().strip()

# Every secret the test handled, by kind: the harness scans the stack's log for each.
SECRETS: dict[str, list[str]] = {"signin": [OPERATOR_TOKEN], "issued": []}


def remember(kind: str, secret: str) -> str:
    SECRETS[kind].append(secret)
    (WORK / "secrets.json").write_text(json.dumps(SECRETS))
    return secret


remember("signin", OPERATOR_TOKEN)


def rpc(addr: str, token: str, method: str, body: dict) -> dict:
    """One call with the real grpcurl; the parsed JSON answer (fields as proto3 JSON names)."""
    out = subprocess.run(
        [
            "grpcurl",
            "-plaintext",
            "-emit-defaults",
            "-H",
            f"authorization: Bearer {token}",
            "-d",
            json.dumps(body),
            addr,
            method,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise AssertionError(f"{method}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def rfc3339(ms: int) -> str:
    return (
        datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def wait_for(what: str, seconds: float, probe):
    """Polls `probe` until it returns something truthy; fails naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            found = probe()
        except AssertionError as e:  # a service answering an error while it gets there
            last = e
            found = None
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def day_range(from_day: str, to_day: str) -> dict:
    """The range a page's date filter covers: [from 00:00, the day after `to`)."""
    start = datetime.datetime.fromisoformat(from_day).replace(tzinfo=datetime.timezone.utc)
    end = datetime.datetime.fromisoformat(to_day).replace(
        tzinfo=datetime.timezone.utc
    ) + datetime.timedelta(days=1)
    return {
        "start": start.isoformat().replace("+00:00", "Z"),
        "end": end.isoformat().replace("+00:00", "Z"),
    }
