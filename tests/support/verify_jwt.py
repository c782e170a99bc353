#!/usr/bin/env python3
"""Verifies a Portcullis access token with an independent JWT implementation (PyJWT), using
nothing but the JWK Set the server publishes over HTTP.

    verify_jwt.py JWKS_URL TOKEN --audience AUD --issuer ISS

Fetches JWKS_URL, picks the key whose `kid` is the token header's, verifies the signature
with the algorithm the JWK names (never the one the token claims), `exp`/`nbf`/`iat`, `iss`
and `aud`, and prints {"kid", "alg", "claims"} as JSON. Exits 1, with the reason on stderr,
when the token does not verify; 2 on a usage error.

Run by tests/api/keys.rs with the venv of scripts/install-test-tools.sh (PyJWT[crypto]).
"""

import argparse
import json
import sys
import urllib.request

import jwt


def fetch_jwks(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers.get_content_type()
        if content_type != "application/json":
            raise ValueError(f"the JWKS came as {content_type!r}, not application/json")
        return json.load(response)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jwks_url")
    parser.add_argument("token")
    parser.add_argument("--audience", required=True)
    parser.add_argument("--issuer", required=True)
    args = parser.parse_args()

    try:
        jwks = fetch_jwks(args.jwks_url)
        kid = jwt.get_unverified_header(args.token).get("kid")
        if not kid:
            raise ValueError("the token has no kid")
        matching = [k for k in jwks.get("keys", []) if k.get("kid") == kid]
        if len(matching) != 1:
            raise ValueError(f"{len(matching)} keys in the JWKS have kid {kid!r}")
        published = matching[0]
        if published.get("use") != "sig":
            raise ValueError(f"key {kid!r} is not a signing key (use={published.get('use')!r})")
        algorithm = published.get("alg")
        if not algorithm:
            raise ValueError(f"key {kid!r} names no alg")
        # PyJWK checks that the key type and curve fit the algorithm.
        key = jwt.PyJWK(published, algorithm=algorithm)
        claims = jwt.decode(
            args.token,
            key=key,
            algorithms=[algorithm],
            audience=args.audience,
            issuer=args.issuer,
            options={"require": ["exp", "nbf", "iat", "iss", "aud", "sub"]},
        )
    except (jwt.PyJWTError, ValueError, OSError) as error:
        print(f"verify_jwt: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"kid": kid, "alg": algorithm, "claims": claims}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
