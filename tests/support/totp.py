"""An authenticator app for the tests: RFC 6238 TOTP (HMAC-SHA1, 6 digits, 30 s steps),
written apart from src/mfa/totp.rs (standard library only) so each checks the other.

    totp.py SECRET [UNIX_TIME]   print the code for UNIX_TIME (default: now)
    totp.py --step N SECRET      print the code for time step N

SECRET is RFC 4648 base32, as in the otpauth URI (any case, padding and spaces optional).
"""

import base64
import hashlib
import hmac
import struct
import sys
import time

DIGITS = 6
PERIOD = 30


def decode_secret(text: str) -> bytes:
    """The key bytes of a base32 secret, as an app reads it from a QR code or by hand."""
    cleaned = text.replace(" ", "").rstrip("=").upper()
    return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))


def hotp(key: bytes, counter: int) -> str:
    """RFC 4226: HMAC-SHA1 over the 8-byte big-endian counter, dynamically truncated."""
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    (word,) = struct.unpack(">I", mac[offset : offset + 4])
    return str((word & 0x7FFFFFFF) % 10**DIGITS).zfill(DIGITS)


def totp(key: bytes, unix_time: int) -> str:
    return hotp(key, unix_time // PERIOD)


def main(argv: list) -> int:
    args = argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    step = None
    if args[0] == "--step":
        if len(args) != 3:
            print("usage: totp.py --step N SECRET", file=sys.stderr)
            return 2
        step, args = int(args[1]), args[2:]
    if len(args) not in (1, 2) or (step is not None and len(args) != 1):
        print("usage: totp.py SECRET [UNIX_TIME]", file=sys.stderr)
        return 2
    try:
        key = decode_secret(args[0])
    except ValueError as e:
        print(f"not a base32 secret: {e}", file=sys.stderr)
        return 2
    if step is None:
        step = (int(args[1]) if len(args) == 2 else int(time.time())) // PERIOD
    print(hotp(key, step))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
