"""Errors of the libvirt domain builder."""

from __future__ import annotations

from vmcraft_tasks.craft.errors import VMCraftError


class DomainSpecError(VMCraftError, ValueError):
    """A domain spec cannot describe a bootable KVM guest (bad value, clash, unsupported arch).

    Also a ValueError: the spec usually comes from JSON or a CLI, where a bad value
    is an input error, and callers that only know ValueError should still catch it.
    """


class DomainXMLError(VMCraftError):
    """virt-xml-validate rejected a domain document, or could not run at all."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
