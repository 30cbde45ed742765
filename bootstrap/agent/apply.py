"""What the seed's enlist answer changes on the node.

``check_answer`` (pure) validates the answer; ``apply_answer`` then, under a
root directory (``/`` on a node, a temporary directory in tests):

1. ``/root/.ssh/authorized_keys`` (0600, directory 0700): the control plane's keys;
2. ``/run/metalseed/chrony/metalseed.sources``: ``server SEED iburst`` per time
   server (the image's chrony.conf has ``sourcedir /run/metalseed/chrony``),
   then ``chronyc reload sources``;
3. ``nft add element inet metalseed provisioning { CIDR }``: SSH and the agent
   are allowed in from the provisioning network (the image's ruleset has the set);
4. the hostname: ``hostnamectl set-hostname``, else ``/proc/sys/kernel/hostname``;
5. for a node that is already a cluster member (``ceph_conf`` in the answer): the
   cluster's ``/etc/ceph/ceph.conf``, then every disk of the inventory that carries
   a bluestore label is handed to ``osd-device.sh --activate-only`` (the same
   script the ``ceph_osd`` role uses) in a transient systemd unit, which starts
   the OSD of this cluster on it.
   A stateless node's OSDs come back after a reboot this way, with no join;
6. ``/run/metalseed/enlist.json``: the answer, written last, once all went well.

Commands (``chronyc``, ``nft``, ``hostnamectl``) run only when ``run_commands``
is set and the command exists; a failed ``chronyc`` or ``hostnamectl`` is a
warning, a failed key, firewall or file write is an error (the control plane
could not reach the node). Files are replaced atomically.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUTHORIZED_KEYS = Path("root/.ssh/authorized_keys")
CHRONY_SOURCES = Path("run/metalseed/chrony/metalseed.sources")
ENLIST_JSON = Path("run/metalseed/enlist.json")
CEPH_CONF = Path("etc/ceph/ceph.conf")
#: the ceph_osd role's script, copied into the image next to the agent
OSD_SCRIPT = Path("usr/lib/metalseed/osd-device.sh")
CEPH_CONF_MAX = 16 * 1024
BLUESTORE = "ceph_bluestore"  # the inventory's signature of a disk with a bluestore label
KERNEL_HOSTNAME = Path("proc/sys/kernel/hostname")
COMMAND_TIMEOUT = 30.0

Runner = Callable[[Sequence[str]], tuple[int, str]]

_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( .*)?$"
)
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


class AnswerError(ValueError):
    """The seed's answer is not what the agent can apply."""


class ApplyError(Exception):
    """Applying the answer failed in a way that leaves the node unreachable."""


@dataclasses.dataclass(frozen=True)
class Answer:
    node: str
    state: str
    ssh_authorized_keys: tuple[str, ...]
    time_servers: tuple[str, ...]
    provisioning_cidr: str | None
    hostname: str
    ceph_conf: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.state,
            "ssh_authorized_keys": list(self.ssh_authorized_keys),
            "time_servers": list(self.time_servers),
            "provisioning_cidr": self.provisioning_cidr,
            "hostname": self.hostname,
            **({"ceph_conf": self.ceph_conf} if self.ceph_conf is not None else {}),
        }


def _strings(data: dict, key: str, pattern: re.Pattern, limit: int = 16) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or len(value) > limit:
        raise AnswerError(f"{key} is not a list of at most {limit} items")
    for item in value:
        if not isinstance(item, str) or "\n" in item or not pattern.match(item):
            raise AnswerError(f"{key} has an item that is not acceptable")
    return tuple(value)


def check_answer(data: dict[str, Any]) -> Answer:
    """Validate the seed's 200 answer. Pure."""
    node = data.get("node")
    if not isinstance(node, str) or not node:
        raise AnswerError("the answer names no node")
    state = data.get("state")
    if not isinstance(state, str):
        raise AnswerError("the answer has no state")
    hostname = data.get("hostname", node)
    if not isinstance(hostname, str) or not _HOSTNAME.match(hostname.lower()):
        raise AnswerError("the answer's hostname is not a valid host name")
    cidr = data.get("provisioning_cidr")
    if cidr is not None:
        try:
            cidr = str(ipaddress.ip_network(cidr, strict=False))
        except (TypeError, ValueError):
            raise AnswerError("provisioning_cidr is not a network") from None
    ceph_conf = data.get("ceph_conf")
    if ceph_conf is not None and (
        not isinstance(ceph_conf, str) or len(ceph_conf) > CEPH_CONF_MAX or "\0" in ceph_conf
    ):
        raise AnswerError("ceph_conf is not a configuration file's text")
    return Answer(
        node=node,
        state=state,
        ssh_authorized_keys=_strings(data, "ssh_authorized_keys", _KEY),
        time_servers=_strings(data, "time_servers", _HOST),
        provisioning_cidr=cidr,
        hostname=hostname.lower(),
        ceph_conf=ceph_conf,
    )


def run_command(argv: Sequence[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, (proc.stderr or proc.stdout).strip()[:300]


def write_file(path: Path, text: str, mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """Replace ``path`` atomically with ``text`` at ``mode``, making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Applier:
    """Applies an ``Answer`` under ``root``; commands only when ``run_commands``."""

    def __init__(
        self,
        root: Path,
        *,
        run_commands: bool,
        run: Runner = run_command,
        which: Callable[[str], str | None] = shutil.which,
        disks: Sequence[dict[str, Any]] = (),
    ) -> None:
        """``disks``: the inventory's disks (the OSDs of a member come back from them)."""
        self.root = root
        self.disks = list(disks)
        self.run_commands = run_commands
        self._run = run
        self._which = which

    def _command(self, name: str, *args: str) -> tuple[int, str] | None:
        """Run ``name ARGS`` if allowed and present: (status, output); None when skipped."""
        if not self.run_commands:
            log.info("not running %s (commands are off)", name)
            return None
        path = self._which(name)
        if path is None:
            log.info("%s is not installed; skipped", name)
            return None
        return self._run([path, *args])

    def authorized_keys(self, answer: Answer) -> None:
        path = self.root / AUTHORIZED_KEYS
        (self.root / "root").mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = ["# written by the metalseed agent at enlist; the control plane's keys"]
        lines += list(answer.ssh_authorized_keys)
        write_file(path, "\n".join(lines) + "\n", mode=0o600, dir_mode=0o700)
        os.chmod(path.parent, 0o700)
        log.info("authorized_keys: %d key(s)", len(answer.ssh_authorized_keys))

    def time_sources(self, answer: Answer) -> None:
        text = "".join(f"server {server} iburst\n" for server in answer.time_servers)
        write_file(self.root / CHRONY_SOURCES, text)
        result = self._command("chronyc", "reload", "sources")
        if result is not None and result[0] != 0:
            log.warning("chronyc reload sources failed (%d): %s", *result)
        log.info("time from %s", ", ".join(answer.time_servers) or "(no servers)")

    def firewall(self, answer: Answer) -> None:
        if answer.provisioning_cidr is None:
            log.warning("the seed named no provisioning network: the firewall is left as is")
            return
        cidr = answer.provisioning_cidr
        result = self._command(
            "nft", "add", "element", "inet", "metalseed", "provisioning", "{", cidr, "}"
        )
        if result is not None and result[0] != 0:
            raise ApplyError(f"nft could not allow {cidr} in ({result[0]}): {result[1]}")
        log.info("provisioning network %s allowed in", cidr)

    def hostname(self, answer: Answer) -> None:
        result = self._command("hostnamectl", "set-hostname", answer.hostname)
        if result is not None and result[0] == 0:
            log.info("hostname %s (hostnamectl)", answer.hostname)
            return
        if result is not None:
            log.warning("hostnamectl failed (%d): %s; writing the kernel's hostname", *result)
        path = self.root / KERNEL_HOSTNAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(answer.hostname + "\n")
        except OSError as exc:
            log.warning("cannot set the hostname in %s: %s", path, exc.strerror or exc)
            return
        log.info("hostname %s", answer.hostname)

    def ceph_osds(self, answer: Answer) -> None:
        if answer.ceph_conf is None:
            return
        write_file(self.root / CEPH_CONF, answer.ceph_conf)
        labelled = [d["name"] for d in self.disks if d.get("signature") == BLUESTORE]
        script = self.root / OSD_SCRIPT
        if not labelled:
            log.info("ceph.conf written; no disk carries an OSD")
            return
        if not script.is_file():
            log.warning("%s is missing: the OSDs on %s are not started", script, labelled)
            return
        for name in labelled:
            # a transient unit of its own: ceph-volume mounts the OSD's tmpfs directory, which
            # must not live in this service's private mount namespace (PrivateTmp)
            result = self._command(
                "systemd-run", "--wait", "--collect", "--quiet", f"--unit=metalseed-osd-{name}",
                "sh", str(script), "ceph", f"/dev/{name}", "--activate-only",
            )  # fmt: skip
            if result is None:
                continue
            if result[0] != 0:
                log.warning("OSD on /dev/%s not started (%d): %s", name, *result)
            else:
                log.info("/dev/%s: %s", name, result[1].splitlines()[-1] if result[1] else "ok")

    def apply(self, answer: Answer) -> None:
        """All of it, in order; ``ApplyError`` (after trying the rest) if a must-have failed."""
        failures: list[str] = []
        steps = (self.authorized_keys, self.time_sources, self.firewall, self.hostname,
                 self.ceph_osds)  # fmt: skip
        for step in steps:
            try:
                step(answer)
            except (OSError, ApplyError) as exc:
                text = str(exc)
                if isinstance(exc, OSError) and exc.strerror:
                    text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
                log.error("%s: %s", step.__name__.replace("_", " "), text)
                failures.append(f"{step.__name__}: {text}")
        if failures:
            raise ApplyError("; ".join(failures))
        write_file(self.root / ENLIST_JSON, json.dumps(answer.to_json(), indent=2) + "\n")
