"""What is (and is not) in the built node image, read from its files.

The squashfs is mounted read-only; commands that need to write (``sshd -T``
wants host keys) run chrooted in a throw-away overlay of it.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.image, pytest.mark.root, pytest.mark.timeout(900)]

#: OpenSSH algorithms a modern configuration may offer (no CBC, no SHA-1, no NIST-only KEX)
MODERN_CIPHERS = {
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
}
MODERN_MACS = {
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "umac-128-etm@openssh.com",
}
MODERN_KEX = {
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
}
HARDENING_CMDLINE = {"slab_nomerge", "init_on_alloc=1", "page_alloc.shuffle=1", "loglevel=4"}


@pytest.fixture(scope="session")
def recipe():
    from bootstrap.image.build import Inputs

    return Inputs().recipe()


def _chroot(root: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=60)


def test_manifest_matches_the_files_and_the_recipe(node_image, recipe, rootfs):
    from bootstrap.image.build import BUILDER_VERSION, Inputs, input_hash

    manifest = node_image.manifest
    for name, path in node_image.files.items():
        entry = manifest["files"][name]
        assert path.stat().st_size == entry["size"], name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], name
    assert manifest["input_hash"] == input_hash(Inputs().hashed_files(), BUILDER_VERSION)
    assert manifest["cmdline"] == recipe.cmdline
    assert HARDENING_CMDLINE <= set(manifest["cmdline"].split())
    packages = manifest["packages"]
    assert set(recipe.packages) <= set(packages)
    assert not set(recipe.purge) & set(packages)
    assert all(isinstance(v, str) and v for v in packages.values())
    assert (rootfs / "usr/lib/modules" / manifest["kernel"] / "modules.dep").is_file()
    assert packages[f"linux-image-{manifest['kernel']}"]


def test_no_docs_manuals_locales_apt_lists_or_compilers(rootfs):
    for empty in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                  "var/lib/apt/lists", "var/cache/apt", "boot", "tmp", "var/tmp"):  # fmt: skip
        left = [p for p in (rootfs / empty).rglob("*") if p.name != "partial"]
        assert left == [], f"/{empty} is not empty: {left[:5]}"
    assert sorted(p.name for p in (rootfs / "usr/lib/locale").iterdir()) == ["C.utf8"]
    for tool in ("gcc", "cc", "c++", "g++", "as", "ld", "ld.bfd", "tcc", "clang", "make"):
        for bindir in ("usr/bin", "usr/sbin", "usr/local/bin"):
            assert not (rootfs / bindir / tool).exists(), f"/{bindir}/{tool}"
    assert not list((rootfs / "usr/bin").glob("x86_64-linux-gnu-*"))
    assert not list((rootfs / "usr/lib").rglob("__pycache__/*.cpython-*.opt-*"))  # nothing odd
    excludes = (rootfs / "etc/dpkg/dpkg.cfg.d/metalseed-minimal").read_text()
    assert "path-exclude=/usr/share/doc/*" in excludes  # they stay out, too


def test_root_is_locked_and_identity_is_made_at_boot(rootfs):
    root = next(line for line in (rootfs / "etc/shadow").read_text().splitlines()
                if line.startswith("root:"))  # fmt: skip
    assert root.split(":")[1] in ("!*", "!", "*", "!!"), "root has a password hash"
    assert not list((rootfs / "etc").glob("shadow-")), "a backup of the unlocked shadow"
    assert (rootfs / "etc/machine-id").read_text() == ""
    assert not (rootfs / "etc/hostname").exists()
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*")), "SSH host keys baked in"


def test_sshd_is_key_only_with_modern_algorithms(scratch_root):
    for kind in ("ed25519", "rsa"):
        key = scratch_root / f"etc/ssh/ssh_host_{kind}_key"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
    (scratch_root / "run/sshd").mkdir(exist_ok=True)
    proc = _chroot(scratch_root, "/usr/sbin/sshd", "-T")
    assert proc.returncode == 0, proc.stderr
    config = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert config["passwordauthentication"] == "no"
    assert config["kbdinteractiveauthentication"] == "no"
    assert config["permitrootlogin"] == "without-password"
    assert config["permitemptypasswords"] == "no"
    assert config["authenticationmethods"] == "publickey"
    assert config["x11forwarding"] == "no" and config["allowtcpforwarding"] == "no"
    assert set(config["ciphers"].split(",")) <= MODERN_CIPHERS
    assert set(config["macs"].split(",")) <= MODERN_MACS
    assert set(config["kexalgorithms"].split(",")) <= MODERN_KEX


def test_nftables_ruleset_is_accepted_and_ships_an_empty_provisioning_set(scratch_root, netlab):
    ns = netlab.namespace("nft")  # `nft -c` asks the kernel: do it in a namespace of ours
    proc = ns.run(["chroot", str(scratch_root), "nft", "-c", "-f", "/etc/nftables.conf"])
    assert proc.returncode == 0, proc.stderr
    rules = (scratch_root / "etc/nftables.conf").read_text()
    assert re.search(r"set provisioning \{\s*type ipv4_addr\s*flags interval\s*\}", rules)
    assert "policy drop" in rules


def test_setuid_files_are_exactly_the_allowed_set(rootfs, recipe, node_image):
    from bootstrap.image.assemble import _setuid_files

    found = sorted(_setuid_files(rootfs))
    assert found == sorted(recipe.setuid_allowed)
    assert node_image.manifest["setuid"] == found


def test_agent_and_its_unit_are_installed(rootfs):
    from bootstrap.image.build import Inputs

    for name, src in Inputs().agent_files().items():
        assert (rootfs / "usr/lib/metalseed" / name).read_bytes() == src.read_bytes(), name
    unit = (rootfs / "etc/systemd/system/metalseed-agent.service").read_text()
    required = (
        "Type=oneshot",
        "RemainAfterExit=yes",
        "After=network-online.target",
        "Wants=network-online.target",
        "Environment=PYTHONPATH=/usr/lib/metalseed",
        "ExecStart=/usr/bin/python3 -m bootstrap.agent",
        "Restart=on-failure",
    )
    for line in required:
        assert re.search(rf"^{re.escape(line)}", unit, re.M), line
    enabled = {p.name for p in (rootfs / "etc/systemd/system").glob("*.wants/*")}
    for unit in (
        "metalseed-agent.service",
        "metalseed-ssh-hostkeys.service",
        "nftables.service",
        "systemd-networkd.service",
        "ssh.service",
        "chrony.service",
        "lldpd.service",
    ):
        assert unit in enabled, unit


def test_time_journal_and_network_configuration(rootfs):
    chrony = (rootfs / "etc/chrony/chrony.conf").read_text()
    assert re.search(r"^cmdport 0$", chrony, re.M) and re.search(r"^port 0$", chrony, re.M)
    assert re.search(r"^sourcedir /run/metalseed/chrony$", chrony, re.M)
    assert not re.search(r"^(server|pool) ", chrony, re.M)
    journald = (rootfs / "etc/systemd/journald.conf.d/metalseed.conf").read_text()
    assert "Storage=volatile" in journald
    network = (rootfs / "etc/systemd/network/80-metalseed.network").read_text()
    assert "Type=ether" in network and "DHCP=yes" in network
    sysctl = (rootfs / "etc/sysctl.d/90-metalseed.conf").read_text()
    keys = dict(re.findall(r"^([\w.]+) = (\S+)$", sysctl, re.M))
    assert keys["kernel.kptr_restrict"] == "2" and keys["kernel.dmesg_restrict"] == "1"
    assert keys["kernel.unprivileged_bpf_disabled"] == "1"
    assert keys["kernel.yama.ptrace_scope"] in ("1", "2", "3")
    assert keys["net.ipv4.conf.all.rp_filter"] == "1" and keys["net.ipv4.tcp_syncookies"] == "1"
    assert keys["fs.protected_symlinks"] == "1" and keys["fs.protected_regular"] == "2"


def test_usbguard_policy_parses(scratch_root):
    rules = (scratch_root / "etc/usbguard/rules.conf").read_text().splitlines()
    rules = [r for r in rules if r.strip() and not r.startswith("#")]
    assert rules
    for rule in rules:
        proc = _chroot(scratch_root, "usbguard-rule-parser", rule)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_initrd_is_reproducible_from_the_image_kernel(node_image, rootfs, recipe):
    from bootstrap.image.build import Inputs
    from bootstrap.image.initrd import node_initrd

    inputs = Inputs()
    modules_dir = rootfs / "usr/lib/modules" / node_image.manifest["kernel"]
    again, modules = node_initrd(
        inputs.recipe_dir, inputs.busybox, modules_dir, recipe.initrd_modules
    )
    built = node_image.files["initrd"].read_bytes()
    assert again == built  # byte for byte
    assert modules == node_image.manifest["initrd_modules"]
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=gzip.decompress(built), capture_output=True, check=True
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "etc/metalseed/udhcpc.script", "etc/metalseed/modules"} <= names
    for mod in ("virtio_net", "e1000", "squashfs", "overlay", "loop"):
        assert f"lib/modules/{mod}.ko" in names, mod
