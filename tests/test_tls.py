"""--https's self-signed pair (written whole, checked to match, key private) and a user's --ssl DIR."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from jmoshi_cli.errors import CacheError, UsageError
from jmoshi_cli.serving import tls

NAMES = {"localhost", "127.0.0.1"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pair_bytes(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "key.pem").read_bytes(), (folder / "cert.pem").read_bytes()


def assert_matching_pair(folder: Path) -> None:
    pair = tls.load_pair(folder)
    assert pair is not None and tls.matches(*pair)
    assert NAMES <= tls.names_in(pair[0])


def test_a_new_pair_matches_and_only_its_owner_reads_the_key(tmp_path):
    folder = tls.ensure_certificate(tmp_path / "tls", NAMES)
    assert_matching_pair(folder)
    assert mode(folder) == 0o700 and mode(folder / "key.pem") == 0o600 and mode(folder / "cert.pem") == 0o644
    assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "key.pem"]  # no temporary file left


def test_a_good_pair_is_reused_and_an_open_key_and_folder_are_closed(tmp_path):
    folder = tls.ensure_certificate(tmp_path / "tls", NAMES)
    before = pair_bytes(folder)
    os.chmod(folder / "key.pem", 0o644)
    os.chmod(folder, 0o755)
    tls.ensure_certificate(folder, NAMES)
    assert pair_bytes(folder) == before
    assert mode(folder / "key.pem") == 0o600 and mode(folder) == 0o700


def test_a_key_that_does_not_match_the_certificate_means_a_new_pair(tmp_path):
    """What a rotation stopped halfway left behind: every --https start failed until the certificate expired."""
    old = tls.ensure_certificate(tmp_path / "old", NAMES)
    other = tls.ensure_certificate(tmp_path / "other", NAMES)
    (old / "key.pem").write_bytes((other / "key.pem").read_bytes())
    stale = pair_bytes(old)
    tls.ensure_certificate(old, NAMES)
    assert_matching_pair(old)
    assert pair_bytes(old)[0] != stale[0] and pair_bytes(old)[1] != stale[1]


def test_an_unreadable_key_means_a_new_pair(tmp_path):
    folder = tls.ensure_certificate(tmp_path / "tls", NAMES)
    (folder / "key.pem").write_text("not a key\n")
    tls.ensure_certificate(folder, NAMES)
    assert_matching_pair(folder)


def _failing_replace(monkeypatch, on_call: int) -> None:
    """os.replace as a crash would leave it: the renames before call number `on_call` done, that one not."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == on_call:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(tls.os, "replace", replace)


def test_a_rotation_stopped_before_any_rename_leaves_the_old_pair_in_use(tmp_path, monkeypatch):
    folder = tls.ensure_certificate(tmp_path / "tls", NAMES)
    old = pair_bytes(folder)
    _failing_replace(monkeypatch, on_call=1)
    with pytest.raises(CacheError, match="No space left on device"):
        tls.ensure_certificate(folder, NAMES | {"gpu-1.lab"})  # a new name: a new pair is due
    assert pair_bytes(folder) == old
    assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "key.pem"]
    monkeypatch.undo()
    assert pair_bytes(tls.ensure_certificate(folder, NAMES)) == old


def test_a_rotation_stopped_between_the_renames_is_repaired_at_the_next_start(tmp_path, monkeypatch):
    folder = tls.ensure_certificate(tmp_path / "tls", NAMES)
    old_key, old_cert = pair_bytes(folder)
    _failing_replace(monkeypatch, on_call=2)  # key.pem renamed, cert.pem not
    with pytest.raises(CacheError):
        tls.ensure_certificate(folder, NAMES | {"gpu-1.lab"})
    new_key, cert = pair_bytes(folder)
    assert new_key != old_key and cert == old_cert  # the key goes first: no new certificate beside an old key
    assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "key.pem"]
    monkeypatch.undo()
    tls.ensure_certificate(folder, NAMES)
    assert_matching_pair(folder)
    assert mode(folder / "key.pem") == 0o600


def test_ssl_dir_with_a_matching_pair_is_accepted(tmp_path):
    folder = tls.ensure_certificate(tmp_path / "mine", NAMES)
    assert tls.check_ssl_dir(folder) == folder


def test_ssl_dir_whose_key_is_not_the_certificates_is_a_usage_error_naming_it(tmp_path):
    folder = tls.ensure_certificate(tmp_path / "mine", NAMES)
    other = tls.ensure_certificate(tmp_path / "other", NAMES)
    (folder / "key.pem").write_bytes((other / "key.pem").read_bytes())
    with pytest.raises(UsageError) as caught:
        tls.check_ssl_dir(folder)
    assert caught.value.message == f"--ssl {folder}: key.pem does not match cert.pem"
    assert "\n" not in caught.value.message and caught.value.hint


def test_ssl_dir_without_a_key_says_so(tmp_path):
    folder = tls.ensure_certificate(tmp_path / "mine", NAMES)
    (folder / "key.pem").unlink()
    with pytest.raises(UsageError, match="no key.pem there"):
        tls.check_ssl_dir(folder)
