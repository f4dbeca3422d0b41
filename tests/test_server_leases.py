"""Leases on a served index version: counted exactly, whatever order requests and their
thread work return them in (real index version, real thread pools)."""
from __future__ import annotations

import shutil
import sys
import threading
from concurrent.futures import Future

import pytest

from indexer.search import open_index
from server.index_holder import IndexHolder, ServedVersion
from server.service import _Lease
from tests.open_files import open_fds
from tests.test_server_support import index_root, server_model, subset  # noqa: F401


def _served(root) -> ServedVersion:
    index = open_index(root, verify=False)
    return ServedVersion(index=index, version=index.version, metadata_fields=frozenset())


def _metadata_file(served: ServedVersion):
    return served.index.path / served.index.manifest["metadata"]["file"]


def _copy_of_current(root, target):
    """Another folder holding the same version (LMDB opens one environment per file per process)."""
    return shutil.copytree(root / "versions" / (root / "CURRENT").read_text().strip(), target)


def test_a_version_refuses_more_releases_than_acquires(index_root, tmp_path):
    served = _served(_copy_of_current(index_root, tmp_path / "v"))
    try:
        served.acquire()
        served.release()
        with pytest.raises(RuntimeError, match="released more often than acquired"):
            served.release()
        assert served.leases == 0 and not served.closed  # the count never goes negative
    finally:
        served.retire()
    assert served.closed


def test_a_request_releasing_twice_with_pending_work_never_closes_a_version_in_use(index_root, tmp_path):
    holder = IndexHolder()
    old = _served(_copy_of_current(index_root, tmp_path / "old"))
    holder.swap(old)
    request = _Lease(holder.acquire())
    work = [Future(), Future()]  # two pieces of thread work still running on the old version
    for future in work:
        future.set_running_or_notify_cancel()
        request.track(future)
    other = holder.acquire()  # another request on the same version
    holder.swap(_served(_copy_of_current(index_root, tmp_path / "new")))  # hot swap: the old version is retired
    request.release()
    request.release()  # a second release (e.g. a retried finally) must not count again
    finishers = [threading.Thread(target=f.set_result, args=(None,)) for f in work]
    for thread in finishers:
        thread.start()
    for thread in finishers:
        thread.join()
    try:
        assert old.leases == 1 and not old.closed  # still held by the other request
    finally:
        other.release()
    assert old.leases == 0 and old.closed
    assert open_fds(_metadata_file(old)) == 0  # the LMDB environment really closed
    holder.close()


def test_thread_work_ending_in_many_threads_at_once_returns_each_lease_once(index_root, tmp_path):
    holder = IndexHolder()
    served = _served(_copy_of_current(index_root, tmp_path / "v"))
    holder.swap(served)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        for _ in range(30):
            request = _Lease(holder.acquire())
            work = [Future() for _ in range(16)]
            for future in work:
                future.set_running_or_notify_cancel()
                request.track(future)
            request.release()
            start = threading.Barrier(len(work))
            threads = [threading.Thread(target=lambda f=f: (start.wait(), f.set_result(None))) for f in work]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert served.leases == 0
    finally:
        sys.setswitchinterval(previous)
    holder.close()
    assert served.closed
