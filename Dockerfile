# One image for every vmcraft-tasks service: the worker, Flower and the scheduler.
# Debian 12, like the conversion hosts scripts/setup.sh prepares.
FROM python:3.11-slim-bookworm

# The tools VMCraft runs: the APT_PACKAGES of scripts/setup.sh, without redis-server
# (Redis runs in its own containers), libvirt-clients (nothing in these services
# calls virsh; the domain XML is written as a file) and what only the tests use to
# build and boot sample guests (debootstrap, qemu-system-x86, seabios, ipxe-qemu,
# busybox-static). bubblewrap is the sandbox of the guest's initramfs generator.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        qemu-utils \
        libnbd-bin \
        fdisk \
        parted \
        util-linux \
        e2fsprogs \
        xfsprogs \
        btrfs-progs \
        ntfs-3g \
        dosfstools \
        mtools \
        fusefat \
        fuse3 \
        libhivex-bin libxml2-utils \
        bubblewrap \
        cpio \
        zstd \
        lvm2 nbdkit nbdkit-plugin-python \
        ovmf grub-efi-amd64-bin \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/vmcraft-tasks
# README.md is the package's long description: the build needs it.
COPY pyproject.toml README.md ./
COPY vmcraft_tasks ./vmcraft_tasks
COPY worker ./worker
COPY scheduler ./scheduler
RUN pip install .

# Root on purpose: attaching disks (qemu-nbd, loop devices, FUSE) and mounting guest
# filesystems need it. The image is never run privileged: docker-compose.yml gives the
# worker only /dev/fuse, /dev/loop-control, loop devices and CAP_SYS_ADMIN, and Flower
# no capability at all. No secret is built in: passwords come from the environment
# (.env is in .dockerignore).
CMD ["celery", "-A", "vmcraft_tasks", "worker", "-l", "info"]
