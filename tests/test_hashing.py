"""Hashing while the bytes arrive: the follower on files another thread writes, then hub.fetch and
artifacts.download against the loopback hub with the real huggingface_hub client, in this process."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import MIB, sha256
from jmoshi_cli.cache import artifacts, hashing, hub
from jmoshi_cli.cache.artifacts import Status
from jmoshi_cli.cache.hashing import FollowingHash
from jmoshi_cli.errors import CacheError, HubError
from jmoshi_cli.upstream import hub_internals

EXT = "nu-dialogue/j-moshi-ext"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as out:
        out.write(data)


# --- the follower on a file written by another thread ----------------------------------------------


def test_follows_a_growing_file_through_its_rename(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    blocks = [os.urandom(n) for n in (1, 300_000, 3 * MIB + 7, 0, 10 * MIB, 12_345)]
    arrived: list[int] = []

    def writer() -> None:
        with partial.open("ab") as out:
            for block in blocks:
                out.write(block)
                out.flush()
                time.sleep(0.03)
        partial.rename(final)

    with FollowingHash(partial, on_arrived=arrived.append, poll_s=0.005) as follower:
        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
        assert follower.finish(final) == digest(b"".join(blocks))
    assert follower.restarts == 0
    assert arrived and arrived == sorted(arrived) and arrived[-1] <= sum(map(len, blocks))


def test_the_follower_keeps_no_reference_to_the_blocks_written(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    partial.touch()
    follower = FollowingHash(partial)
    follower.open()  # followed, its thread not started: whatever it kept of a block would still be kept
    block = os.urandom(2 * MIB)
    before = sys.getrefcount(block)
    with partial.open("ab") as raw:
        hub_internals.PartialFile(raw, None).write(block)  # what huggingface_hub's http_get writes through
    assert sys.getrefcount(block) == before  # read back from the file: its memory is the writer's to reuse
    partial.rename(final)
    assert follower.finish(final) == digest(block)
    follower.close()


def test_a_resumed_file_is_hashed_from_the_part_already_there(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    head, tail = os.urandom(5 * MIB), os.urandom(2 * MIB)
    partial.write_bytes(head)
    with FollowingHash(partial, poll_s=0.005) as follower:
        wait_for(lambda: follower.hashed == len(head))
        append(partial, tail)
        partial.rename(final)
        assert follower.finish(final) == digest(head + tail)
    assert follower.restarts == 0


def test_a_truncated_file_is_hashed_again_from_zero(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    first, second = os.urandom(2 * MIB), os.urandom(MIB + 5)
    with FollowingHash(partial, poll_s=0.005) as follower:
        partial.write_bytes(first)
        wait_for(lambda: follower.hashed == len(first))
        os.truncate(partial, 0)  # same inode, shorter than what was hashed
        wait_for(lambda: follower.restarts == 1)
        append(partial, second)
        partial.rename(final)
        assert follower.finish(final) == digest(second)


def test_a_replaced_file_is_never_vouched_for_wrongly(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    old, new = os.urandom(3 * MIB), os.urandom(4 * MIB)
    with FollowingHash(partial, poll_s=0.005) as follower:
        partial.write_bytes(old)
        wait_for(lambda: follower.hashed == len(old))
        # Removed and written anew, longer than before: only the new inode tells them apart.
        partial.unlink()
        partial.write_bytes(new)
        partial.rename(final)
        result = follower.finish(final)
    # Either it saw the new file before the rename (and hashed it), or it cannot vouch for it.
    assert result in (digest(new), None)
    assert result is None or follower.restarts == 1


def test_a_replaced_file_seen_before_the_rename_is_hashed(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    old, new = os.urandom(3 * MIB), os.urandom(4 * MIB)
    with FollowingHash(partial, poll_s=0.005) as follower:
        partial.write_bytes(old)
        wait_for(lambda: follower.hashed == len(old))
        partial.unlink()
        partial.write_bytes(new)
        wait_for(lambda: follower.restarts == 1 and follower.hashed == len(new))
        partial.rename(final)
        assert follower.finish(final) == digest(new)


def test_a_truncate_the_thread_missed_but_the_writer_reported_is_never_vouched_for(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    old, new = os.urandom(2 * MIB), os.urandom(3 * MIB)
    partial.write_bytes(old)
    with FollowingHash(partial, poll_s=60) as follower:  # caught up, it looks again only in a minute
        wait_for(lambda: follower.hashed == len(old))
        with partial.open("r+b") as stream:  # cut back and written again, past what was hashed
            stream.truncate(0)
            stream.write(new)
            stream.flush()
            hashing.note_rewind(stream.fileno())
        partial.rename(final)
        assert follower.restarts == 0  # the thread never saw the file shorter
        assert follower.finish(final) is None


def test_rewinds_are_kept_only_while_a_file_is_followed(tmp_path):
    before = hashing.files_followed()
    for n in range(20):  # a long-lived process downloads many files: the table must not grow with them
        partial = tmp_path / f"blob{n}.incomplete"
        partial.write_bytes(b"x" * 10)
        with FollowingHash(partial, poll_s=0.005) as follower:
            wait_for(lambda: follower.hashed == 10)  # noqa: B023 - waited for before the next file
            assert hashing.files_followed() == before + 1
            with partial.open("r+b") as stream:
                hashing.note_rewind(stream.fileno())
        assert hashing.files_followed() == before
    with (tmp_path / "unfollowed").open("wb") as stream:
        hashing.note_rewind(stream.fileno())  # a writer nobody follows leaves nothing behind
    assert hashing.files_followed() == before


def test_a_reported_truncate_restarts_the_hash(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    old, new = os.urandom(2 * MIB), os.urandom(3 * MIB)
    with FollowingHash(partial, poll_s=0.005) as follower:
        partial.write_bytes(old)
        wait_for(lambda: follower.hashed == len(old))
        with partial.open("ab") as raw:
            stream = hub_internals.PartialFile(raw, None)  # what huggingface_hub's http_get writes through
            stream.seek(0)
            stream.truncate()
            stream.write(new)
        wait_for(lambda: follower.restarts >= 1 and follower.hashed == len(new))
        partial.rename(final)
        assert follower.finish(final) == digest(new)


def test_huggingface_hub_downloads_write_through_the_rewind_reporter():
    from huggingface_hub import file_download

    assert hub_internals.report_rewinds()
    assert getattr(file_download.http_get, "jmoshi_reports_rewinds", False)
    assert hub_internals.report_rewinds()  # once only: the wrapper is not wrapped again


def test_the_tail_after_the_rename_is_read_from_the_same_file(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    head, tail = os.urandom(2 * MIB), os.urandom(9 * MIB)
    hashed: list[int] = []
    with FollowingHash(partial, on_hashed=hashed.append, poll_s=0.005) as follower:
        partial.write_bytes(head)
        wait_for(lambda: follower.hashed == len(head))
        append(partial, tail)
        partial.rename(final)  # the last bytes landed: whatever was not read yet is read now
        assert follower.finish(final) == digest(head + tail)
    assert hashed[-1] == len(head) + len(tail)


def test_a_final_file_that_is_not_the_followed_one_gets_no_digest(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    data = os.urandom(MIB)
    with FollowingHash(partial, poll_s=0.005) as follower:
        partial.write_bytes(data)
        wait_for(lambda: follower.hashed == len(data))
        final.write_bytes(data)  # same content, another file: nothing proves they are the same
        assert follower.finish(final) is None


def test_a_final_file_shorter_than_what_was_hashed_gets_no_digest(tmp_path):
    partial, final = tmp_path / "blob.incomplete", tmp_path / "blob"
    data = os.urandom(2 * MIB)
    with FollowingHash(partial, poll_s=0.005) as follower:
        partial.write_bytes(data)
        wait_for(lambda: follower.hashed == len(data))
        partial.rename(final)
        os.truncate(final, MIB)
        digest = follower.finish(final)
    # The follower may see the file shrink before finish() stops it, and start over on what is there: then
    # its digest is that of the bytes on disk. Never that of the 2 MiB it hashed before.
    assert digest in (None, hashlib.sha256(data[:MIB]).hexdigest())


def test_nothing_followed_gives_no_digest(tmp_path):
    final = tmp_path / "blob"
    final.write_bytes(b"written straight to its final name")
    with FollowingHash(tmp_path / "blob.incomplete", poll_s=0.005) as follower:
        time.sleep(0.02)
        assert follower.finish(final) is None
    with FollowingHash(tmp_path / "other.incomplete") as follower:
        assert follower.finish(tmp_path / "missing") is None


# --- hub.fetch and artifacts.download against the loopback hub, in this process --------------------


@pytest.fixture
def here(hub, tmp_path, monkeypatch):
    """This process talks to the loopback hub (every setting is read at call time) with an empty cache."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HOME", "HUGGINGFACE_HUB_CACHE",
                 "JMOSHI_VARIANTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JMOSHI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JMOSHI_RETRY_BASE_S", "0.05")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return hub


def plan_for(web_ui: bool = False) -> artifacts.Plan:
    from jmoshi_cli.variants import load_catalogue

    catalogue = load_catalogue()
    return artifacts.resolve(catalogue, catalogue.get("ext"), web_ui=web_ui)


def model(plan: artifacts.Plan) -> artifacts.Entry:
    return plan.entry("moshi")


def cached_files(kind: str) -> list[Path]:
    return list(hub.repo_folder(EXT).glob(kind))


def test_fetch_hashes_the_file_while_it_arrives(here, hub_root):
    for entry in plan_for().entries:  # small ones too: the follower is on the file before its first byte
        fetched = hub.fetch(entry.artifact)
        assert fetched.sha256 == entry.artifact.sha256 == sha256(hub_root / EXT / entry.artifact.filename)
        assert sha256(fetched.path) == fetched.sha256


def test_a_download_failing_before_its_first_byte_leaves_no_partial(here):
    here.set_gated(EXT, "hf_granted")
    with pytest.raises(HubError, match="gated"):
        artifacts.download(plan_for())
    assert cached_files("blobs/*") == []


def test_fetch_follows_the_file_across_a_cut_and_its_resume(here, hub_root):
    entry = model(plan_for())
    here.add_fault(EXT, "model.safetensors", "cut")
    retries: list[int] = []
    fetched = hub.fetch(entry.artifact, on_retry=lambda attempt, exc, delay: retries.append(attempt))
    assert retries == [1]
    ranged = [r for r in here.requests if r[0] == "GET" and "Range" in r[2]]
    assert ranged and ranged[-1][2]["Range"].startswith("bytes=10485760-")
    assert fetched.sha256 == entry.artifact.sha256


def test_fetch_hashes_a_partial_left_by_an_earlier_run_then_follows(here, hub_root):
    entry = model(plan_for())
    blobs = hub.repo_folder(EXT) / "blobs"
    blobs.mkdir(parents=True)
    head = (hub_root / EXT / "model.safetensors").read_bytes()[: 5 * MIB]
    (blobs / f"{entry.artifact.sha256}.incomplete").write_bytes(head)
    fetched = hub.fetch(entry.artifact)
    assert [r[2]["Range"] for r in here.requests if r[0] == "GET" and "Range" in r[2]] == [f"bytes={5 * MIB}-"]
    assert fetched.sha256 == entry.artifact.sha256


def test_the_overlapped_hash_catches_a_corrupt_body(here, hub_root):
    entry = model(plan_for())
    here.add_fault(EXT, "model.safetensors", "corrupt")
    fetched = hub.fetch(entry.artifact)
    assert fetched.sha256 is not None and fetched.sha256 != entry.artifact.sha256
    assert fetched.sha256 == sha256(fetched.path)  # it hashed exactly the bytes that landed
    checked = artifacts.verify(artifacts.inspect(entry.artifact), sha256=fetched.sha256)
    assert checked.status is Status.CORRUPT
    assert not artifacts.is_stamped(fetched.path)


def test_a_corrupt_body_is_removed_and_fetched_again(here, hub_root):
    here.add_fault(EXT, "model.safetensors", "corrupt")
    seen: list[Status] = []
    done = artifacts.download(plan_for(), on_progress=lambda e, n: seen.append(e.status))
    path = model(done).path
    assert sha256(path) == sha256(hub_root / EXT / "model.safetensors")
    assert Status.CORRUPT in seen and seen[-1] is Status.COMPLETE
    assert artifacts.is_stamped(path)


def test_a_body_corrupt_every_time_never_stays_in_the_cache(here):
    here.add_fault(EXT, "model.safetensors", "corrupt", times=5)
    with pytest.raises(CacheError, match="arrived corrupt 2 times"):
        artifacts.download(plan_for())
    assert cached_files("snapshots/*/model.safetensors") == []
    bad = model(plan_for()).artifact.sha256
    assert not (hub.repo_folder(EXT) / "blobs" / bad).exists(), "no blob left"
    assert model(plan_for()).status is Status.MISSING
    # the files downloaded beside it are whole and verified, or not there at all
    for blob in cached_files("blobs/*"):
        assert blob.name.endswith(".incomplete") or artifacts.is_stamped(blob), blob


def test_a_truncated_body_is_never_complete(here, hub_root):
    here.add_fault(EXT, "model.safetensors", "cut", times=50)
    with pytest.raises(HubError):
        artifacts.download(plan_for())
    assert cached_files("snapshots/*/model.safetensors") == []
    entry = model(plan_for())
    assert entry.status is Status.PARTIAL and 0 < entry.partial_bytes < entry.artifact.size
    here.clear_faults()
    done = artifacts.download(plan_for())
    assert sha256(model(done).path) == sha256(hub_root / EXT / "model.safetensors")


def test_small_files_arrive_while_the_weights_still_download(here, hub_root):
    here.slow_delay = 0.005  # the weights take about a second; the other files a fraction of one
    here.add_fault(EXT, "model.safetensors", "slow")
    finished: dict[str, float] = {}

    def progress(entry, done):
        if entry.status is Status.COMPLETE:
            finished[entry.artifact.filename] = time.monotonic()

    done = artifacts.download(plan_for(), on_progress=progress)
    assert max(finished, key=finished.get) == "model.safetensors", finished
    for entry in done.entries:
        assert sha256(entry.path) == sha256(hub_root / EXT / entry.artifact.filename)
        assert artifacts.is_stamped(entry.path)  # every stamp kept, though they were written side by side


def test_a_failing_file_stops_the_download_beside_it_which_stays_resumable(here, hub_root):
    here.slow_delay = 0.02  # the weights: 10 MiB (huggingface_hub's block) in ~3 s, all of them in ~8 s
    here.add_fault(EXT, "model.safetensors", "slow")
    here.add_fault(EXT, "tokenizer_spm_32k_3.model", "500", times=50)  # fails for good in about a second
    with pytest.raises(HubError):
        artifacts.download(plan_for())
    weights = model(plan_for())
    assert weights.status is Status.PARTIAL, "stopped at its next block, not left to finish"
    assert 0 < weights.partial_bytes < weights.artifact.size
    size = weights.partial_bytes
    time.sleep(0.3)
    assert model(plan_for()).partial_bytes == size, "nothing writes to the cache after the error"
    here.clear_faults()
    done = artifacts.download(plan_for())
    assert sha256(model(done).path) == sha256(hub_root / EXT / "model.safetensors")


def test_a_partial_longer_than_the_file_is_dropped_not_resumed(here, hub_root):
    entry = model(plan_for())
    blobs = hub.repo_folder(EXT) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{entry.artifact.sha256}.incomplete").write_bytes(os.urandom(entry.artifact.size + 100))
    done = artifacts.download(plan_for())
    assert sha256(model(done).path) == sha256(hub_root / EXT / "model.safetensors")


class Recorder:
    """A DownloadWatch that keeps what it is told."""

    def __init__(self, plan):
        self.progressed: list[tuple[str, Status, int]] = []
        self.hashed: dict[str, list[int]] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def progress(self, entry, done):
        self.progressed.append((entry.artifact.filename, entry.status, done))

    def retry(self, entry, attempt, exc, delay):
        pass

    def hashing(self, entry, done):
        self.hashed.setdefault(entry.artifact.filename, []).append(done)


def put_there_by_another_tool(plan: artifacts.Plan) -> None:
    from huggingface_hub import hf_hub_download

    for entry in plan.entries:
        hf_hub_download(EXT, entry.artifact.filename, revision=entry.artifact.commit, cache_dir=hub.cache_dir(),
                        endpoint=hub.endpoint())


def test_files_another_tool_cached_are_hashed_with_progress(here):
    put_there_by_another_tool(plan_for())
    plan = plan_for()
    assert plan.missing == [] and len(artifacts.needs_hashing(plan)) == 3
    views: list[Recorder] = []
    done = artifacts.fetch_missing(plan, watch=lambda p: views.append(Recorder(p)) or views[-1])
    view = views[0]
    assert view.progressed == []  # nothing was downloaded
    for entry in done.entries:
        reports = view.hashed[entry.artifact.filename]
        assert reports == sorted(reports) and reports[-1] == entry.artifact.size
        assert artifacts.is_stamped(entry.path)
    assert artifacts.needs_hashing(plan_for()) == []


def test_a_corrupt_file_another_tool_cached_is_hashed_then_fetched_again(here, hub_root):
    put_there_by_another_tool(plan_for())
    blob = Path(os.path.realpath(model(plan_for()).path))
    with blob.open("r+b") as stream:
        stream.seek(1000)
        stream.write(b"\0" * 8)
    views: list[Recorder] = []
    done = artifacts.fetch_missing(plan_for(), watch=lambda p: views.append(Recorder(p)) or views[-1])
    assert views[0].hashed["model.safetensors"][-1] == model(done).artifact.size
    assert views[0].progressed[0][:2] == ("model.safetensors", Status.CORRUPT)
    assert views[0].progressed[-1][1] is Status.COMPLETE
    assert sha256(model(done).path) == sha256(hub_root / EXT / "model.safetensors")
