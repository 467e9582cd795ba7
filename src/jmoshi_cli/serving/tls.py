"""A self-signed certificate for --https: browsers give the microphone only to HTTPS or localhost."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from ..errors import UsageError

VALID_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=7)


def _names_in(cert) -> set[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _usable(folder: Path, names: set[str]) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    except (OSError, ValueError):
        return False
    if not (folder / "key.pem").is_file():
        return False
    now = dt.datetime.now(dt.timezone.utc)
    return cert.not_valid_after_utc - RENEW_BEFORE > now and names <= _names_in(cert)


def ensure_certificate(folder: Path, names: set[str]) -> Path:
    """Reuse folder/cert.pem if it is valid for a while and covers names, else make a new one."""
    if _usable(folder, names):
        return folder
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jmoshi self-signed")])
    alt: list[x509.GeneralName] = []
    for name in sorted(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    key_path = folder / "key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_bytes)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder


def check_ssl_dir(folder: Path) -> Path:
    """A user's --ssl DIR must hold cert.pem and key.pem that load together."""
    import ssl

    folder = folder.expanduser()
    for name in ("cert.pem", "key.pem"):
        if not (folder / name).is_file():
            raise UsageError(f"--ssl {folder}: no {name} there", "the folder needs cert.pem and key.pem (PEM)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(folder / "cert.pem", folder / "key.pem")
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--ssl {folder}: cert.pem and key.pem do not load: {exc}",
                         "check that the key matches the certificate and is not encrypted") from None
    return folder
