"""The node agent: runs inside the node image, reports the machine to the seed.

Standard library only: the image has Debian's ``python3`` and nothing else of
ours, and only ``bootstrap/__init__.py`` and ``bootstrap/agent/*.py`` are
copied into it (to ``/usr/lib/metalseed``). Run as ``python3 -m
bootstrap.agent`` by a systemd oneshot unit; see ``main.py`` for the flow and
the exit codes.

Modules: ``cmdline`` (what the seed put on the kernel command line),
``inventory`` and ``disks`` (what the machine is, from /sys and /proc; ``sysfs``
reads the attribute files),
``client`` (the enlist POST with retries), ``apply`` (what the seed's answer
changes on the node), ``main`` (the command).
"""
