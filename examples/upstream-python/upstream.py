#!/usr/bin/env python3
"""A OneProtect upstream in Python, with no OneProtect code.

It trusts a request's agent identity only when the gateway's signed identity
assertion (x-oneprotect-identity-assertion, an EdDSA JWT) verifies against
the keys the enroll-api publishes as a JWK Set, and only when every identity
header the request carries is the one the assertion binds:

  - signature by a published key (fetched at start; fetched again at once for
    a key id not seen yet, which is how a rotated gateway key arrives);
  - alg EdDSA only; iss the gateway fleet's; aud this upstream's route;
  - exp and iat present, 5 s of clock skew, a lifetime of at most 60 s;
  - sub, tenant_id, agent_id agree, and x-oneprotect-{tenant-id, agent-id,
    cert-serial, spiffe-id, cert-not-after} each appear once and equal the
    claims.

Verified requests get 200 with the identity as JSON; every other request
gets 401 application/problem+json (code identity_required). Standard library
HTTP server plus PyJWT (requirements.txt).

  python3 upstream.py --jwks-url http://127.0.0.1:8080/.well-known/jwks.json \\
      --audience workers --listen 127.0.0.1:9000

It prints "listening on HOST:PORT" once it serves (port 0 picks one).
"""

import argparse
import datetime
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

ASSERTION = "x-oneprotect-identity-assertion"
MAX_LIFETIME = 60
LEEWAY = 5
PROBLEM_BASE = "https://oneprotect.dev/problems/"


class Refused(Exception):
    """Why a request's identity is not believed."""


def one_header(headers, name):
    values = headers.get_all(name) or []
    if len(values) != 1:
        raise Refused(f"{name} must appear exactly once")
    return values[0]


def rfc3339_to_unix(text):
    return int(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def verify(headers, jwks, audience, issuer):
    token = one_header(headers, ASSERTION)
    try:
        header = jwt.get_unverified_header(token)
        if header.get("alg") != "EdDSA" or "crit" in header:
            raise Refused("assertion must be alg EdDSA without crit")
        key = jwks.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=["EdDSA"],
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.PyJWKClientError as e:
        raise Refused(f"unknown signing key: {e}") from None
    except jwt.InvalidTokenError as e:
        raise Refused(f"assertion does not verify: {e}") from None
    lifetime = claims["exp"] - claims["iat"]
    if not 0 < lifetime <= MAX_LIFETIME:
        raise Refused("assertion lifetime is not within 60 s")
    sub = claims["sub"]
    tenant, agent = claims.get("tenant_id"), claims.get("agent_id")
    if sub.split("/tenant/", 1)[-1] != f"{tenant}/agent/{agent}":
        raise Refused("assertion claims are inconsistent")
    bound = {
        "x-oneprotect-tenant-id": tenant,
        "x-oneprotect-agent-id": agent,
        "x-oneprotect-cert-serial": claims.get("serial"),
        "x-oneprotect-spiffe-id": sub,
    }
    for name, claim in bound.items():
        if one_header(headers, name) != claim:
            raise Refused(f"{name} does not match the assertion")
    try:
        not_after = rfc3339_to_unix(one_header(headers, "x-oneprotect-cert-not-after"))
    except ValueError:
        raise Refused("x-oneprotect-cert-not-after is not RFC 3339") from None
    if not_after != claims.get("cert_not_after"):
        raise Refused("x-oneprotect-cert-not-after does not match the assertion")
    return {
        "tenant_id": tenant,
        "agent_id": agent,
        "spiffe_id": sub,
        "serial": claims.get("serial"),
        "kid": jwt.get_unverified_header(token).get("kid"),
    }


def make_handler(jwks, audience, issuer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body, content_type):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def handle_any(self):
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(min(length, 1 << 20))
            try:
                agent = verify(self.headers, jwks, audience, issuer)
            except Refused as e:
                self.answer(
                    401,
                    {
                        "type": PROBLEM_BASE + "identity_required",
                        "title": "A verified agent identity is required",
                        "status": 401,
                        "code": "identity_required",
                        "detail": str(e),
                    },
                    "application/problem+json",
                )
                return
            self.answer(200, {"path": self.path, "agent": agent}, "application/json")

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

        def log_message(self, fmt, *args):  # quiet; never log the assertion
            pass

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jwks-url", required=True, help="the enroll-api's /.well-known/jwks.json")
    p.add_argument("--audience", required=True, help="this upstream's gateway route audience")
    p.add_argument("--issuer", default="oneprotect-gateway")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks one)")
    args = p.parse_args()

    jwks = jwt.PyJWKClient(args.jwks_url, cache_keys=True, lifespan=60, timeout=5)
    try:
        jwks.get_jwk_set(refresh=True)  # fail closed: no keys, no service
    except jwt.PyJWKClientError as e:
        print(f"cannot fetch {args.jwks_url}: {e}", file=sys.stderr)
        return 1
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), make_handler(jwks, args.audience, args.issuer))
    print(f"listening on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
