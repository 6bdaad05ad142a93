"""A self-signed certificate for 127.0.0.1 / localhost, made with the openssl CLI, for TLS tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def self_signed(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """(cert.pem, key.pem) in ``directory``: an EC P-256 key and a 1-day certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS tests need the openssl command line tool (apt-get install openssl)")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
