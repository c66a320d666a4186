"""One error tree for the VMCraft library.

Errors carry fields (image, device, command, exit code, stderr tail) rather than
flattened strings, so callers and reports can say exactly what failed.
"""

from __future__ import annotations

from collections.abc import Sequence


class VMCraftError(Exception):
    """Root of every error the library raises on purpose."""


class CommandError(VMCraftError):
    """An external command failed, timed out or could not be started."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stderr: str = "",
        stdout: str = "",
        *,
        timed_out: bool = False,
        reason: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        self.timed_out = timed_out
        self.reason = reason
        super().__init__(self._describe())

    @property
    def stderr_tail(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return " | ".join(lines[-3:])

    def _describe(self) -> str:
        cmd = " ".join(self.argv)
        if self.reason:
            return f"{cmd}: {self.reason}"
        if self.timed_out:
            return f"{cmd}: timed out"
        tail = self.stderr_tail
        return f"{cmd}: exit {self.returncode}" + (f": {tail}" if tail else "")


class ImageError(VMCraftError):
    """The disk image cannot be used: missing, unsupported, corrupt, incomplete."""

    def __init__(self, image: str, reason: str) -> None:
        self.image = image
        self.reason = reason
        super().__init__(f"{image}: {reason}")


class ImageNotFoundError(ImageError):
    pass


class UnsupportedImageError(ImageError):
    pass


class CorruptImageError(ImageError):
    pass


class AttachError(VMCraftError):
    """Attaching the disk over NBD failed."""

    def __init__(self, image: str, reason: str, *, attempts: int = 1) -> None:
        self.image = image
        self.reason = reason
        self.attempts = attempts
        super().__init__(f"attach {image}: {reason}")


class TransientAttachError(AttachError):
    """An attach failure worth retrying (socket not ready, device busy, helper died early)."""


class BackendUnavailableError(AttachError):
    """The requested attach backend cannot run on this host (module missing, tool missing)."""


class NotLaunchedError(VMCraftError):
    def __init__(self) -> None:
        super().__init__("the disk is not attached: call launch() first")


class ReadOnlyError(VMCraftError):
    def __init__(self, operation: str) -> None:
        self.operation = operation
        super().__init__(f"{operation} needs write mode: open the image with readonly=False")


class PartitionError(VMCraftError):
    """The partition table could not be read or changed."""


class ImagePolicyError(ImageError):
    """The image refers to something it may not: a protocol, a host device, a file
    outside the image roots. Permanent: the image itself says so."""


class ImageLimitError(ImageError):
    """The image exceeds a configured limit (virtual size, partition count). Permanent."""


class PartitionLimitError(ImageLimitError, PartitionError):
    """The partition table defines more partitions than `max_partitions`."""


class ImageChangedError(ImageError):
    """A file of the image changed between its check and its use."""


class MountError(VMCraftError):
    def __init__(self, device: str, mountpoint: str, reason: str) -> None:
        self.device = device
        self.mountpoint = mountpoint
        self.reason = reason
        super().__init__(f"mount {device} on {mountpoint}: {reason}")


class GuestPathError(VMCraftError):
    """A guest path could not be resolved inside the guest root."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"guest path {path}: {reason}")


class InspectError(VMCraftError):
    pass
