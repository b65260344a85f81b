#!/usr/bin/env python3
"""Put the Ray cluster's auth token where ``ray start`` reads it, before Ray starts on a node.

cluster/gcp.yaml runs this on the head and on every worker (its setup commands), then starts Ray
with ``RAY_AUTH_MODE=token``: every Ray API, the dashboard and the job server then demand the token.

The token comes from, in order:

1. ``$RAY_AUTH_TOKEN`` when the node's environment has it;
2. Google Secret Manager: the latest version of secret ``$GUM_RAY_AUTH_SECRET`` (default
   ``gum-ray-auth-token``) in the node's project, read with the node's service account (a token from
   the metadata server; the account needs ``roles/secretmanager.secretAccessor`` on that one secret).

It is written to ``$RAY_AUTH_TOKEN_PATH`` (default ``~/.ray/auth_token``) with mode 0600, atomically.
The token is never printed. Without a token the script exits 1 with one line, so the node's set-up
fails and Ray never starts without authentication.

Standard library only (it runs before anything is installed). ``GCE_METADATA_HOST`` (the
google-auth convention) and ``GUM_SECRET_MANAGER_URL`` point it at other endpoints; both must be
loopback or HTTPS, so the service account's token never leaves the machine in clear.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_SECRET = "gum-ray-auth-token"
METADATA = "http://{host}/computeMetadata/v1/{path}"
SECRET_MANAGER = "https://secretmanager.googleapis.com"
TIMEOUT_S = 10


class TokenError(Exception):
    pass


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _metadata(path: str) -> str:
    host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    name = urllib.parse.urlsplit(f"http://{host}").hostname or ""
    if name != "metadata.google.internal" and not _loopback(name):
        raise TokenError(f"GCE_METADATA_HOST={host} is neither the metadata server nor loopback")
    req = urllib.request.Request(METADATA.format(host=host, path=path), headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        return r.read().decode()


def from_secret_manager() -> str:
    base = os.environ.get("GUM_SECRET_MANAGER_URL", SECRET_MANAGER).rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if parts.scheme != "https" and not _loopback(parts.hostname or ""):
        raise TokenError(f"GUM_SECRET_MANAGER_URL={base} must be https (or loopback)")
    secret = os.environ.get("GUM_RAY_AUTH_SECRET", DEFAULT_SECRET)
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or _metadata("project/project-id").strip()
    access = json.loads(_metadata("instance/service-accounts/default/token"))["access_token"]
    url = f"{base}/v1/projects/{project}/secrets/{secret}/versions/latest:access"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {access}"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        payload = json.loads(r.read().decode())["payload"]["data"]
    return base64.b64decode(payload).decode().strip()


def write_token(token: str, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> int:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    where = "RAY_AUTH_TOKEN"
    if not token:
        where = f"Secret Manager secret {os.environ.get('GUM_RAY_AUTH_SECRET', DEFAULT_SECRET)}"
        try:
            token = from_secret_manager()
        except (TokenError, OSError, KeyError, ValueError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", None) or exc
            print(f"ray_auth_token: no Ray auth token: RAY_AUTH_TOKEN is unset and {where} could not "
                  f"be read ({type(exc).__name__}: {str(reason)[:160]}); Ray will not start without one",
                  file=sys.stderr)
            return 1
    if len(token) < 16 or any(c.isspace() for c in token):
        print(f"ray_auth_token: the token from {where} is too short or holds whitespace; generate one "
              "with `ray get-auth-token --generate`", file=sys.stderr)
        return 1
    write_token(token, path)
    print(f"ray_auth_token: wrote the Ray auth token from {where} to {path} (mode 0600)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
