"""Throwaway TLS material made at test time with the ``openssl`` command: a CA, a server certificate
for 127.0.0.1 and localhost, and a client certificate, each with its key (P-256, valid one day)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr}")


def make_certificates(folder: Path) -> Certificates:
    """Write the CA, server and client certificates and keys into ``folder``; skips without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    _openssl(
        "req", "-x509", "-new", *key, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=xflow test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    made = {}
    for who, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        cert, private, request, ext = (folder / f"{who}.{x}" for x in ("crt", "key", "csr", "ext"))
        ext.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        _openssl("req", "-new", *key, "-keyout", private, "-out", request, "-subj", f"/CN=xflow test {who}")
        _openssl(
            "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-set_serial", str(1 + len(made)),
            "-days", "1", "-out", cert, "-extfile", ext,
        )  # fmt: skip
        made[who] = (cert, private)
    return Certificates(ca, *made["server"], *made["client"])
