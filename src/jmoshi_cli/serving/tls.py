"""A self-signed certificate for --https: browsers give the microphone only to HTTPS or localhost."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from pathlib import Path

from ..errors import CacheError, UsageError

VALID_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=7)


def names_in(cert) -> set[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def load_pair(folder: Path):
    """folder's (certificate, private key), or None when either is missing or cannot be read as PEM."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: an encrypted key
        return None
    return cert, key


def matches(cert, key) -> bool:
    """Whether the private key is the one whose public half the certificate carries."""
    from cryptography.hazmat.primitives import serialization

    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _usable(folder: Path, names: set[str]) -> bool:
    pair = load_pair(folder)
    if pair is None or not matches(*pair):
        return False
    now = dt.datetime.now(dt.timezone.utc)
    return pair[0].not_valid_after_utc - RENEW_BEFORE > now and names <= names_in(pair[0])


def ensure_certificate(folder: Path, names: set[str]) -> Path:
    """Reuse folder's pair if the key matches the certificate, which is valid for a while and covers names;
    else make a new pair. The key is readable by its owner alone, in a folder only its owner can open."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if (folder / "key.pem").is_file():
            os.chmod(folder / "key.pem", 0o600)
        if not _usable(folder, names):
            _write_pair(folder, *_make_pair(names))
    except OSError as exc:
        raise CacheError(f"cannot write the HTTPS certificate in {folder}: {exc.strerror or exc}",
                         "check that the folder is yours and the disk is not full") from None
    return folder


def _make_pair(names: set[str]) -> tuple[bytes, bytes]:
    """A new self-signed certificate for names, and its key: (key PEM, certificate PEM)."""
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
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    return key_bytes, cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(folder: Path, key: bytes, cert: bytes) -> None:
    """Both files are written in full beside their final names first, then renamed into place, each
    rename atomic: a crash leaves no file half-written. Two renames cannot be one, so the order matters:
    key.pem first, cert.pem last. cert.pem is the commit point: a new certificate is only ever beside its
    own key, and a crash between the renames leaves the old certificate beside the new key, which
    `_usable` finds mismatched, so the next start makes a new pair instead of serving one that fails."""
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data, mode in (("key.pem", key, 0o600), ("cert.pem", cert, 0o644)):
            staged.append((_staged(folder, name, data, mode), folder / name))
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:  # only there when something failed before its rename
            temporary.unlink(missing_ok=True)
    _sync_folder(folder)


def _staged(folder: Path, name: str, data: bytes, mode: int) -> Path:
    """data in a new file of folder, created with mode (never readable by others, not even for a moment)
    and on disk before it is renamed, so that a power cut cannot leave an empty file under the final name."""
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def _sync_folder(folder: Path) -> None:
    """The renames themselves on disk: a folder's entries are flushed with the folder (POSIX only)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_ssl_dir(folder: Path) -> Path:
    """A user's --ssl DIR must hold cert.pem and key.pem that load together."""
    import ssl

    folder = folder.expanduser()
    for name in ("cert.pem", "key.pem"):
        if not (folder / name).is_file():
            raise UsageError(f"--ssl {folder}: no {name} there", "the folder needs cert.pem and key.pem (PEM)")
    pair = load_pair(folder)
    if pair is not None and not matches(*pair):
        raise UsageError(f"--ssl {folder}: key.pem does not match cert.pem",
                         "put the certificate's own private key in key.pem (the pair that was issued together)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(folder / "cert.pem", folder / "key.pem")
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--ssl {folder}: cert.pem and key.pem do not load: {exc}",
                         "check that the key matches the certificate and is not encrypted") from None
    return folder
