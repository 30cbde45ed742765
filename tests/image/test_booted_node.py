"""Security check of the booted node image: its own systemd, in network namespaces.

The image's rootfs boots under ``systemd-nspawn --boot`` on an overlay (the
image is not modified) in a network namespace wired to a provisioning peer
that runs dnsmasq. What a container cannot show: the kernel command line and
the kernel-wide sysctls (those are the host's; the network sysctls of its own
namespace are the image's), and chrony, which needs CAP_SYS_TIME and stays
down. ``test_image_contents.py`` checks those statically.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.image.conftest import (
    MACHINE_HOSTNAME,
    MACHINE_IP,
    OUTSIDER_IP,
    PEER_IP,
    PROVISIONING_CIDR,
    install_lynis,
)

pytestmark = [
    pytest.mark.image,
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.timeout(900),
]

#: what listens on a booted node before it joins: sshd, and networkd's DHCP client
EXPECTED_LISTENERS = {("tcp", 22, "sshd"), ("udp", 68, "systemd-network")}
#: lynis hardening index the image must reach (measured in a container, see README)
LYNIS_TARGET = 80


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n  {text}", flush=True)


@pytest.fixture(scope="module")
def node(node_image, rootfs, booter):
    machine = booter.boot(rootfs, "n")
    machine.wait_booted()
    # the DHCP lease (and the hostname from it) may come just after boot
    deadline = time.monotonic() + 30
    while MACHINE_IP not in machine.run("ip", "-4", "-br", "addr").stdout:
        assert time.monotonic() < deadline, "the machine got no DHCP lease"
        time.sleep(0.5)
    return machine


def _connect(peer, source: str, port: int, timeout: float = 2.0) -> str:
    """From the peer namespace: "open" + banner, "refused" or "timeout"."""
    script = (
        "import socket, sys\n"
        "s = socket.socket()\n"
        f"s.settimeout({timeout})\n"
        f"s.bind(({source!r}, 0))\n"
        "try:\n"
        f"    s.connect(({MACHINE_IP!r}, {port}))\n"
        "except ConnectionRefusedError:\n"
        "    print('refused'); sys.exit()\n"
        "except (TimeoutError, socket.timeout):\n"
        "    print('timeout'); sys.exit()\n"
        "try:\n"
        "    print('open', s.recv(64).decode(errors='replace').strip())\n"
        "except (TimeoutError, socket.timeout):\n"
        "    print('open')\n"
    )
    proc = peer.run(["python3", "-c", script], timeout=timeout + 10)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_boots_without_failed_units(node):
    failed = node.run("systemctl", "--failed", "--no-legend", "--plain").stdout.strip()
    assert failed == "", failed
    for unit in ("nftables", "ssh", "systemd-networkd", "lldpd", "metalseed-ssh-hostkeys"):
        assert node.run("systemctl", "is-active", unit).stdout.strip() == "active", unit


def test_firewall_drops_unlisted_ports_and_admits_ssh_only_from_provisioning(node):
    listener = subprocess.Popen(
        [*node.netns.prefix, "python3", "-c",
         "import socket, time\n"
         "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind(('0.0.0.0', 8081)); s.listen(); time.sleep(120)"],
    )  # fmt: skip
    try:
        time.sleep(0.5)
        assert node.run("ss", "-ltnH", "sport = :8081").stdout.strip(), "listener not up"
        # the set ships empty: nothing but ICMP answers, not even SSH
        assert node.run("nft", "list", "set", "inet", "metalseed", "provisioning").returncode == 0
        assert _connect(node.peer, PEER_IP, 8081) == "timeout"
        assert _connect(node.peer, PEER_IP, 22) == "timeout"
        assert _connect(node.peer, PEER_IP, 6789) == "timeout"

        # what the node agent does after enlisting
        add = ["nft", "add", "element", "inet", "metalseed", "provisioning"]
        assert node.run(*add, "{", PROVISIONING_CIDR, "}").returncode == 0
        try:
            assert _connect(node.peer, PEER_IP, 22).startswith("open SSH-2.0-OpenSSH")
            assert _connect(node.peer, PEER_IP, 6789) == "refused"  # allowed, nothing there
            assert _connect(node.peer, PEER_IP, 8081) == "timeout"  # still not listed
            assert _connect(node.peer, OUTSIDER_IP, 22) == "timeout"  # not provisioning
        finally:
            node.run("nft", "delete", "element", "inet", "metalseed", "provisioning",
                     "{", PROVISIONING_CIDR, "}")  # fmt: skip
    finally:
        listener.kill()
        listener.wait()


def test_listening_ports_are_exactly_the_expected_set(node):
    out = node.run("ss", "-lntupH").stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        port = int(fields[4].rsplit(":", 1)[1])
        proc = re.search(r'users:\(\("([^"]+)"', line)
        found.add((fields[0], port, proc.group(1) if proc else "?"))
    assert found == EXPECTED_LISTENERS, out


def test_root_password_is_locked(node):
    shadow = node.run("cat", "/etc/shadow").stdout
    root = next(line for line in shadow.splitlines() if line.startswith("root:"))
    password = root.split(":")[1]
    assert password.startswith(("!", "*")), "root has a usable password hash"
    assert node.run("passwd", "-S", "root").stdout.split()[1] == "L"


def test_sshd_refuses_passwords_and_accepts_the_control_plane_key(node, tmp_path):
    add = [
        "nft",
        "add",
        "element",
        "inet",
        "metalseed",
        "provisioning",
        "{",
        PROVISIONING_CIDR,
        "}",
    ]
    assert node.run(*add).returncode == 0
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh = [
        "ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
    ]  # fmt: skip
    try:
        denied = node.peer.run(
            [*ssh, "-o", "BatchMode=yes", "-o", "PreferredAuthentications=password",
             "-o", "PubkeyAuthentication=no", f"root@{MACHINE_IP}", "true"],
            timeout=30,
        )  # fmt: skip
        assert denied.returncode == 255
        assert "Permission denied (publickey)" in denied.stderr, denied.stderr

        # what the agent does at enlist: the control plane's key for root
        ssh_dir = node.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        ok = node.peer.run(
            [*ssh, "-o", "BatchMode=yes", "-i", str(key), f"root@{MACHINE_IP}", "hostname"],
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        node.run("nft", "delete", "element", "inet", "metalseed", "provisioning",
                 "{", PROVISIONING_CIDR, "}")  # fmt: skip
        (node.root / "root/.ssh/authorized_keys").unlink(missing_ok=True)


def test_hostname_comes_from_dhcp(node):
    deadline = time.monotonic() + 20
    while (name := node.run("hostname").stdout.strip()) != MACHINE_HOSTNAME:
        assert time.monotonic() < deadline, f"hostname is {name!r}"
        time.sleep(0.5)


def test_journal_is_volatile_and_host_keys_are_fresh(node, rootfs):
    assert node.run("test", "-d", "/run/log/journal").returncode == 0
    persistent = node.run("find", "/var/log/journal", "-type", "f").stdout.strip()
    assert persistent == "", f"journal files on disk: {persistent}"
    keys = node.run("sh", "-c", "ls /etc/ssh/ssh_host_*_key").stdout.split()
    assert sorted(keys) == ["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key"]
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*")), "host keys baked into the image"


def test_network_sysctls_are_applied(node):
    for key, value in {
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.all.accept_redirects": "0",
        "net.ipv4.conf.all.send_redirects": "0",
        "net.ipv4.conf.all.accept_source_route": "0",
        "net.ipv4.tcp_syncookies": "1",
        "net.ipv6.conf.all.accept_redirects": "0",
    }.items():
        assert node.run("sysctl", "-n", key).stdout.strip() == value, key


def lost_points(log: str) -> dict[str, tuple[int, int]]:
    """lynis log -> {test id: (points given, points possible)} where not all were given."""
    lost: dict[str, tuple[int, int]] = {}
    test = "?"
    for line in log.splitlines():
        if m := re.search(r"Performing test ID (\S+)", line):
            test = m.group(1)
        elif m := re.search(
            r"assigned partial number of hardening points \((\d+) of (\d+)\)", line
        ):
            got, most = lost.get(test, (0, 0))
            lost[test] = (got + int(m.group(1)), most + int(m.group(2)))
    return lost


def _lynis(machine) -> tuple[int, str]:
    path = install_lynis(machine.root)
    proc = machine.run(
        "sh", "-c",
        f"cd {path} && ./lynis audit system --quick --no-colors "
        "--logfile /var/tmp/lynis.log --report-file /var/tmp/lynis-report.dat",
        timeout=600,
    )  # fmt: skip
    report = (machine.root / "var/tmp/lynis-report.dat").read_text()
    m = re.search(r"^hardening_index=(\d+)$", report, re.M)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    return int(m.group(1)), (machine.root / "var/tmp/lynis.log").read_text()


def test_lynis_hardening_index_beats_stock_minbase(
    node, stock_minbase, booter, lynis_files, capsys
):
    ours, log = _lynis(node)
    stock_machine = booter.boot(stock_minbase, "s")
    stock_machine.wait_booted()
    stock, _ = _lynis(stock_machine)
    lost = " ".join(f"{t}:{got}/{most}" for t, (got, most) in sorted(lost_points(log).items()))
    _report(capsys, f"lynis hardening index: node image {ours}, stock debootstrap minbase {stock}")
    _report(capsys, f"lynis points the node image misses (test:given/possible): {lost}")
    assert ours > stock
    assert ours >= LYNIS_TARGET
