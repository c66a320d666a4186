"""The host's LVM state, checked around every test that reads a guest's LVM: /etc/lvm,
/run/lvm and lvm's lock dir byte-for-byte unchanged, and one that did not exist still
does not. Test modules import `host_lvm_unchanged` (an autouse fixture)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

HOST_LVM_TREES = ("/etc/lvm", "/run/lvm", "/run/lock/lvm")


def tree_digest(root: str) -> str | None:
    """Names, types, modes, mtimes and contents of everything under `root`; None if absent."""
    if not os.path.lexists(root):
        return None
    digest = hashlib.sha256()
    for here, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            path = os.path.join(here, name)
            st = os.lstat(path)
            digest.update(
                f"{os.path.relpath(path, root)}\0{st.st_mode}\0{st.st_mtime_ns}\0".encode()
            )
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    digest.update(fh.read())
    st = os.lstat(root)
    digest.update(f"{st.st_mode}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def host_lvm_unchanged() -> Iterator[None]:
    """The host's /etc/lvm and /run/lvm (and lvm's lock dir) are byte-for-byte unchanged;
    one that did not exist still does not."""
    before = {root: tree_digest(root) for root in HOST_LVM_TREES}
    yield
    after = {root: tree_digest(root) for root in HOST_LVM_TREES}
    assert after == before
