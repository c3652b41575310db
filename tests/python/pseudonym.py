#!/usr/bin/env python3
"""An independent implementation of Sightline's keyed pseudonym (common.proto, FIELD_ACTION_KEYED_HASH).

Usage: pseudonym.py SECRET_HEX ORG_ID CLASS VALUE [VERSION]
Prints the pseudonym. Uses only the standard library (HKDF per RFC 5869 on hmac/hashlib).
"""
import hashlib
import hmac
import sys


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def pseudonym(secret: bytes, org_id: str, data_class: str, value: str, version: int = 1) -> str:
    org_key = hkdf_sha256(secret, b"sightline.pseudonym.v1", org_id.encode())
    mac = hmac.new(org_key, data_class.encode() + b"\x00" + value.encode(), hashlib.sha256).digest()
    return f"psn{version}_{mac[:16].hex()}"


if __name__ == "__main__":
    secret_hex, org, cls, value = sys.argv[1:5]
    version = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    print(pseudonym(bytes.fromhex(secret_hex), org, cls, value, version))
