"""Schema validation of domain XML with libvirt's own `virt-xml-validate`.

libvirt's RelaxNG schema is the contract; checking against it here finds a bad
element before `virsh define` does on some other host, hours into a batch.
"""

from __future__ import annotations

import os
import tempfile

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.craft.libvirt.errors import DomainXMLError

VALIDATE_TIMEOUT_S = 30.0
# The shell's "command not found" exit status.
_NOT_FOUND = 127


def validate_domain_file(path: str, *, timeout: float = VALIDATE_TIMEOUT_S) -> None:
    """Raise DomainXMLError unless `path` is a valid libvirt domain document."""
    try:
        commands.run(["virt-xml-validate", path, "domain"], timeout=timeout)
    except CommandError as exc:
        # virt-xml-validate is a shell script around xmllint, which Debian ships
        # separately (libxml2-utils): a missing xmllint is a setup problem, not
        # an invalid document, and must not read like one.
        if exc.returncode == _NOT_FOUND or (exc.returncode is None and not exc.timed_out):
            raise DomainXMLError(
                "virt-xml-validate cannot run (needs libvirt-clients and libxml2-utils)",
                exc.stderr_tail or str(exc),
            ) from exc
        detail = (exc.stderr or exc.stdout).strip()
        raise DomainXMLError(f"{path}: not a valid libvirt domain", detail) from exc


def validate_domain_xml(xml_text: str, *, timeout: float = VALIDATE_TIMEOUT_S) -> None:
    """Like `validate_domain_file`, for XML text not yet written anywhere."""
    fd, path = tempfile.mkstemp(prefix="vmcraft-domain-", suffix=".xml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(xml_text)
        validate_domain_file(path, timeout=timeout)
    finally:
        os.unlink(path)
