"""Make the guest's initramfs generator include the virtio drivers (pure renderers).

A VMware guest's initramfs carries the drivers of its old controllers (vmw_pvscsi,
mptspi, ahci, ...), not virtio_blk: on KVM the kernel then cannot find its root disk.
These files tell the generator to add virtio. The initramfs itself is NOT rebuilt
here: that needs the guest's own tools and kernel modules, so it must happen on first
boot (or in a later step that can run them).
"""

from __future__ import annotations

from vmcraft_tasks.craft.fixes.model import Change

# Block, SCSI, network, the PCI transport they all sit on, and the console.
DRACUT_VIRTIO_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci", "virtio_console")
INITRAMFS_TOOLS_VIRTIO_MODULES = ("virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci")
REGENERATE_NOTE = (
    "the initramfs was not regenerated offline: rebuild it on first boot "
    "(dracut -f / update-initramfs -u) or in a later step, or the virtio drivers "
    "may be missing from it"
)


def render_dracut_virtio_conf(drivers: tuple[str, ...] = DRACUT_VIRTIO_DRIVERS) -> str:
    """The dracut.conf.d snippet that adds `drivers` to every initramfs dracut builds."""
    # dracut concatenates add_drivers+= values, so the surrounding spaces are required.
    return (
        "# Written by vmcraft: virtio drivers so the guest can boot on KVM.\n"
        f'add_drivers+=" {" ".join(drivers)} "\n'
    )


def _module_name(line: str) -> str | None:
    words = line.split("#", 1)[0].split()
    # modprobe treats - and _ in module names as the same character.
    return words[0].replace("-", "_") if words else None


def ensure_initramfs_modules(
    text: str, modules: tuple[str, ...] = INITRAMFS_TOOLS_VIRTIO_MODULES
) -> tuple[str, list[Change]]:
    """/etc/initramfs-tools/modules: append the `modules` not listed yet, keep the rest."""
    present = {name for line in text.splitlines() if (name := _module_name(line))}
    missing = [module for module in modules if module.replace("-", "_") not in present]
    if not missing:
        return text, []
    prefix = text if not text or text.endswith("\n") else text + "\n"
    changes = [Change(None, module, "virtio driver for booting on KVM") for module in missing]
    return prefix + "".join(f"{module}\n" for module in missing), changes
