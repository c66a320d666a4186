"""Mounting a guest's filesystems: from the plan of options to the guest's own tree.

- `plan`: which options, driver and fallback rungs a filesystem gets (pure).
- `host`: what the host kernel can mount (reads /proc and /lib/modules).
- `ladder`: mount one filesystem, climbing the fallback ladder until a rung holds.
- `parallel`: mount many at once, in waves, never hiding a child under its parent.
- `tracker`: every mount made is tracked and released deepest first.
- `tree`: the guest's tree as the guest mounts it (/boot, /var, ... bound inside /).

Import the submodules; this package re-exports nothing.
"""
