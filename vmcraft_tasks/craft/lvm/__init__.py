"""LVM in userspace: read a VM's VG metadata and expose its LVs without device-mapper
and without touching the host's LVM.

- `tools.report(devices)`: lvm2's own `pvs`/`lvs --segments`/`pvs --segments` JSON
  reports, run with a private `LVM_SYSTEM_DIR` per call (`config.lvm_conf`): a filter
  admitting exactly `devices`, no devices file, no hints, no udev, no backup/archive,
  no activation, locks inside the private dir. `tools.run_lvm` runs any other
  allowed command the same way (`pvcreate`/`vgcfgrestore` only with `writable=True`).
- `layout.parse(report) -> tuple[VG, ...]`: frozen `VG`, `PV`, `LV`, `Segment`; each LV
  has `reason` (None when exposable): thin pool/volume, RAID/mirror, cache, snapshot,
  striped, a segment on a missing PV. `layout.luks_reason(name)` for LUKS volumes.
  VGs are told apart by uuid, never by name.
- `expose.expose(vg, lv, parent) -> ExposedLV`: a loop device (single segment) or
  nbdkit + nbdfuse + loop (several segments or PVs), read-only unless `writable=True`;
  `expose.release(state_dir)` / `expose.release_all(parent)` undo it from the record
  alone. `expose.dm_table`/`dm_name`/`dm_create`: the device-mapper kernel path.

Host caveat: on a host running udev with lvm2's rules, every loop/nbd device that
carries a PV signature gets `pvscan --cache --autoactivation event` under the *host's*
lvm.conf, which may activate the guest VG host-wide. Such hosts need
`global/event_activation = 0`, or a host `devices/global_filter` rejecting
`/dev/loop*` and `/dev/nbd*` (our private config sets its own filter), or lvm's
devices file (`use_devicesfile = 1`) listing only the host's PVs.
"""
