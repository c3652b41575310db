#!/usr/bin/env python3
"""An independent verifier for Sightline consent receipts.

It knows only what sightline.consent.v1.ConsentReceipt documents: the payload is compact UTF-8 JSON
with a fixed set of keys in a fixed order, and the signature is Ed25519 (RFC 8032) over exactly the
payload bytes. It uses the `cryptography` package, nothing of Sightline's.

    verify_receipt.py PUBLIC_KEY_HEX PAYLOAD_HEX SIGNATURE_HEX

Prints VALID and the stated consent, or INVALID and why; exits 0 or 1.
"""

import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KEYS = [
    "type", "org_id", "version", "usage_level", "sharing_level", "contribute_metadata",
    "contribute_in_app_data", "compliance_restricted", "actor", "reason", "created_at_ms", "key_id",
]


def verify(public_key: bytes, payload: bytes, signature: bytes) -> str:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except InvalidSignature:
        raise ValueError("signature does not verify")
    statement = json.loads(payload.decode("utf-8"))
    if list(statement.keys()) != KEYS:
        raise ValueError(f"payload keys are not the documented ones: {list(statement.keys())}")
    if statement["type"] != "sightline.consent.receipt.v1":
        raise ValueError("not a consent receipt")
    compact = json.dumps(statement, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if compact != payload:
        raise ValueError("payload is not in canonical compact form")
    return (f"org {statement['org_id']} v{statement['version']}: usage {statement['usage_level']}, "
            f"sharing {statement['sharing_level']}")


def main() -> int:
    public_key = bytes.fromhex(sys.argv[1])
    payload = bytes.fromhex(sys.argv[2])
    signature = bytes.fromhex(sys.argv[3])
    try:
        print("VALID", verify(public_key, payload, signature))
        return 0
    except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print("INVALID", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
