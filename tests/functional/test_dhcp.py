"""DHCP against real clients in network namespaces: udhcpc, dhclient, dnsmasq next door.

Each test builds its own segment: a switch namespace with a bridge, the seed
namespace with ``prov0`` (10.X.0.1/24), and client namespaces on the bridge.
The DHCP service runs as ``python -m bootstrap.boot.dhcp.server`` inside the
seed namespace and is stopped by PID, like every other process started here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bootstrap.lab.netns import Netns, NetnsLab
from bootstrap.models import BmcAddress
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore
from tests.conftest import REPO, stop_process

pytestmark = [pytest.mark.root, pytest.mark.netns]

_octets = itertools.count(40 + os.getpid() % 50)

PXE_BIOS = ["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"]
PXE_UEFI = ["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"]
IPXE = [*PXE_UEFI, "-x", "0x4d:69505845"]

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc event script for the tests: record the event's variables, configure the address
env | sort > "$OUT.$1.tmp" && mv "$OUT.$1.tmp" "$OUT.$1"
case "$1" in
deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew) ip -4 addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface" ;;
esac
exit 0
"""

# Runs inside a client namespace: raw-socket helpers the shell clients cannot do.
HELPER = r'''
import json, socket, struct, sys, time
from scapy.layers.l2 import Ether
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, ICMPv6ND_RA, ICMPv6ND_RS
from bootstrap.boot.dhcp.packets import parse, build_request, MessageType, Opt, MalformedPacket

def packet_socket(iface):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((iface, 0))
    return s

def sniff_dhcp(iface, seconds):
    """Print the DHCP replies seen on the wire until just after an ACK, at most `seconds`."""
    s = packet_socket(iface)
    print("ready", flush=True)
    found, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            frame = s.recv(65535)
        except socket.timeout:
            break
        pkt = Ether(frame)
        if UDP not in pkt or pkt[UDP].sport not in (67, 4011):
            continue
        try:
            msg = parse(bytes(pkt[UDP].payload))
        except MalformedPacket:
            continue
        found.append({
            "src": pkt.payload.src, "sport": pkt[UDP].sport, "type": msg.message_type.name,
            "yiaddr": msg.yiaddr, "siaddr": msg.siaddr, "server_id": msg.server_id,
            "vendor": msg.vendor_class,
            "bootfile": msg.options.get(Opt.BOOTFILE, b"").decode(),
        })
        if msg.message_type is MessageType.ACK:  # and a little longer, for late offers
            deadline = min(deadline, time.monotonic() + 0.5)
    print(json.dumps(found), flush=True)

def router_solicit(iface):
    """Send an RS; print the first RA's Ethernet/IPv6 addresses and router lifetime."""
    s = packet_socket(iface)
    s.settimeout(3)
    out = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    out.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    out.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    index = socket.if_nametoindex(iface)
    out.sendto(bytes(ICMPv6ND_RS()), ("ff02::2", 0, 0, index))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        pkt = Ether(s.recv(65535))
        if ICMPv6ND_RA in pkt:
            ra = pkt[ICMPv6ND_RA]
            print(json.dumps({"dst_mac": pkt.dst, "src": pkt[IPv6].src, "dst": pkt[IPv6].dst,
                              "hlim": pkt[IPv6].hlim, "lifetime": ra.routerlifetime}))
            return
    print(json.dumps(None))

def garbage(count):
    """Junk to port 67, broadcast and unicast: short, random, truncated, oversized."""
    import random
    rnd = random.Random(7)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    good = build_request(MessageType.DISCOVER, mac="02:00:00:00:00:99", xid=1)
    samples = [b"", b"\x01", good[:100], good[:241], good + b"\x3c\xff" + b"x" * 10,
               bytes(rnd.getrandbits(8) for _ in range(3000))]
    for i in range(count):
        data = samples[i % len(samples)] if i < len(samples) else rnd.randbytes(rnd.randrange(600))
        for dest in (("255.255.255.255", 67), (sys.argv[3], 67)):
            s.sendto(data, dest)
    print("sent", flush=True)

def proxy_request(iface, server, mac, ciaddr):
    """A PXE client's DHCPREQUEST to the proxy on 4011; print the answer."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    s.bind((ciaddr, 68))
    s.settimeout(3)
    options = [(Opt.VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"), (Opt.CLIENT_ARCH, b"\0\0")]
    s.sendto(build_request(MessageType.REQUEST, mac=mac, xid=77, ciaddr=ciaddr,
                           broadcast=False, options=options), (server, 4011))
    data, (src, sport) = s.recvfrom(4096)
    msg = parse(data)
    print(json.dumps({"src": src, "sport": sport, "type": msg.message_type.name,
                      "file": msg.options.get(Opt.BOOTFILE, b"").decode()}))

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "sniff":
        sniff_dhcp(sys.argv[2], float(sys.argv[3]))
    elif cmd == "rs":
        router_solicit(sys.argv[2])
    elif cmd == "garbage":
        garbage(int(sys.argv[2]))
    elif cmd == "proxy-request":
        proxy_request(*sys.argv[2:6])
'''


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        stop_process(self.proc)


@dataclasses.dataclass
class Segment:
    lab: NetnsLab
    switch: Netns
    bridge: str
    seed: Netns
    net: str  # "10.X.0"
    tmp: Path
    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    clients: int = 0

    @property
    def seed_ip(self) -> str:
        return f"{self.net}.1"

    @property
    def pool(self) -> str:
        return f"{self.net}.100-{self.net}.120"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def store(self) -> SqliteStore:
        return SqliteStore(self.state / "state.db", SecretBox(self.state / "secret.key"))

    def client(self, name: str, *, bridge: str | None = None, address: str | None = None) -> Netns:
        self.clients += 1
        ns = self.lab.namespace(name)
        mac = f"52:54:00:{int(self.net.split('.')[1]):02x}:00:{self.clients:02x}"
        self.lab.link(self.switch, bridge or self.bridge, ns, "eth0", mac=mac, address=address)
        return ns

    def mac(self, ns: Netns) -> str:
        return json.loads(ns.ip("-j", "link", "show", "eth0").stdout)[0]["address"]

    def popen(self, ns: Netns, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with log.open("w") as fh:
            proc = ns.popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, **kwargs)
        self.procs.append(proc)
        return proc

    def serve(self, *args: str, ready: bool = True, timeout: float = 20) -> Server:
        """Start the DHCP service in the seed namespace; wait for it to serve (or exit)."""
        argv = [sys.executable, "-m", "bootstrap.boot.dhcp.server", "--interface", "prov0"]
        argv += ["--state-dir", str(self.state), *args]
        log = self.tmp / f"dhcp-{len(self.procs)}.log"
        server = Server(self.popen(self.seed, argv, log), log)
        deadline = time.monotonic() + timeout
        while True:
            if "dhcp: serving" in server.text():
                return server
            if server.proc.poll() is not None:
                if ready:
                    raise AssertionError(f"DHCP service exited: {server.text()}")
                return server
            if time.monotonic() > deadline:
                raise AssertionError(f"DHCP service not ready: {server.text()}")
            time.sleep(0.05)

    def full(self, *args: str, **kw) -> Server:
        return self.serve("--pool", self.pool, "--probe-seconds", "0.3", *args, **kw)

    def udhcpc(
        self, ns: Netns, *args: str, check: bool = True, retry: bool = False, timeout: float = 20
    ) -> dict:
        """busybox udhcpc once; the variables of its ``bound`` event.

        ``retry``: start over after a failed exchange instead of giving up.
        """
        out = self.tmp / f"udhcpc-{ns.name}"
        argv = ["udhcpc", "-f", "-q", "-i", "eth0", "-s", str(self.script), "-t", "5", "-T", "1"]
        argv += ["-A", "1"] if retry else ["-n"]
        proc = ns.run([*argv, *args], env={**os.environ, "OUT": str(out)}, timeout=timeout)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return read_env(out.with_name(out.name + ".bound")) if proc.returncode == 0 else {}

    @property
    def script(self) -> Path:
        path = self.tmp / "udhcpc.sh"
        if not path.exists():
            path.write_text(UDHCPC_SCRIPT)
            path.chmod(0o755)
        return path

    @property
    def helper_path(self) -> Path:
        path = self.tmp / "helper.py"
        if not path.exists():
            path.write_text(HELPER)
        return path

    def helper(self, ns: Netns, *args: str, timeout: float = 20) -> str:
        """Run a HELPER command in ``ns``; its stdout."""
        proc = ns.run([sys.executable, str(self.helper_path), *args], timeout=timeout, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def dnsmasq(self, ns: Netns) -> subprocess.Popen:
        """dnsmasq handing out 10.X.0.50-99 from ``ns`` (address 10.X.0.2)."""
        argv = [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--no-ping",
            f"--dhcp-range={self.net}.50,{self.net}.99,1h", "--interface=eth0",
            f"--dhcp-leasefile={self.tmp / 'dnsmasq.leases'}",
            f"--pid-file={self.tmp / 'dnsmasq.pid'}",
        ]  # fmt: skip
        proc = self.popen(ns, argv, self.tmp / "dnsmasq.log")
        deadline = time.monotonic() + 10
        while ":67 " not in ns.run(["ss", "-Hluan"]).stdout:
            assert proc.poll() is None, (self.tmp / "dnsmasq.log").read_text()
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.05)
        return proc


def read_env(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture
def segment(netlab, tmp_path):
    octet = next(_octets) % 200 + 20
    switch = netlab.namespace("sw")
    bridge = netlab.bridge(switch)
    seed = netlab.namespace("seed")
    netlab.link(switch, bridge, seed, "prov0", address=f"10.{octet}.0.1/24")
    seg = Segment(netlab, switch, bridge, seed, f"10.{octet}.0", tmp_path)
    try:
        yield seg
    finally:
        for proc in reversed(seg.procs):
            stop_process(proc)


def in_pool(seg: Segment, ip: str) -> bool:
    return ip.startswith(seg.net + ".") and 100 <= int(ip.rsplit(".", 1)[1]) <= 120


# -- full mode ----------------------------------------------------------------------------------


@pytest.mark.peer
def test_pxe_and_ipxe_clients_get_leases_and_their_boot(segment):
    segment.full()
    bios, uefi, ipxe = (segment.client(n) for n in ("bios", "uefi", "ipxe"))

    got = segment.udhcpc(bios, *PXE_BIOS, "-O", "bootfile")
    assert in_pool(segment, got["ip"])
    assert got["bootfile"] == got["boot_file"] == "undionly.kpxe"
    assert got["siaddr"] == got["serverid"] == got["tftp"] == segment.seed_ip
    assert got["vendor"] == "PXEClient"  # firmware PXE gets option 60 back
    assert "opt175" not in got

    efi = segment.udhcpc(uefi, *PXE_UEFI, "-O", "bootfile")
    assert efi["bootfile"] == "ipxe.efi"

    script = segment.udhcpc(ipxe, *IPXE, "-O", "bootfile")
    mac = segment.mac(ipxe)
    url = f"http://{segment.seed_ip}:80/boot/{mac.replace(':', '-')}.ipxe"
    assert script["bootfile"] == url
    assert script["opt175"] == "b00101"  # no-pxedhcp
    assert "vendor" not in script  # and no option 60 PXEClient for iPXE

    assert len({got["ip"], efi["ip"], script["ip"]}) == 3
    store = segment.store()
    leases = {lease.mac: lease for lease in store.leases()}
    store.close()
    assert leases[mac].ip == script["ip"] and leases[mac].state == "bound"
    assert leases[segment.mac(bios)].ip == got["ip"]


@pytest.mark.peer
def test_dhclient_lease_persists_across_restart_and_is_released(segment):
    server = segment.full("--router", segment.seed_ip, "--dns", segment.seed_ip)
    client = segment.client("isc")
    leasefile, pidfile = segment.tmp / "dhclient.leases", segment.tmp / "dhclient.pid"
    runs = itertools.count()

    def dhclient(*extra: str) -> str:
        """dhclient in the foreground (-d), stopped by PID once bound; its log."""
        log = segment.tmp / f"dhclient-{next(runs)}.log"
        argv = ["dhclient", "-d", "-1", "-v", "-sf", "/bin/true", "-lf", str(leasefile)]
        proc = segment.popen(client, [*argv, "-pf", str(pidfile), *extra, "eth0"], log)
        if "-r" in extra:  # a release: it sends DHCPRELEASE and exits
            assert proc.wait(30) == 0, log.read_text()
        else:
            wait_for(lambda: "bound to" in log.read_text() or proc.poll() is not None, "a lease")
            assert "bound to" in log.read_text(), log.read_text()
            stop_process(proc)
        return log.read_text()

    log = dhclient()
    first = leasefile.read_text()
    ip = first.split("fixed-address ")[-1].split(";")[0]
    assert in_pool(segment, ip)
    assert f"option routers {segment.seed_ip}" in first
    assert f"DHCPACK of {ip}" in log

    server.stop()
    segment.full()  # same state directory: the lease is reloaded
    store = segment.store()
    [lease] = store.leases()
    assert (lease.ip, lease.mac, lease.state) == (ip, segment.mac(client), "bound")

    # a fresh DISCOVER from that MAC is offered its address again
    assert segment.udhcpc(client)["ip"] == ip
    client.ip("addr", "flush", "dev", "eth0")

    # dhclient starts from its lease file (INIT-REBOOT) and renews the same address
    log = dhclient()
    assert f"DHCPREQUEST for {ip}" in log and f"DHCPACK of {ip}" in log
    assert "DHCPDISCOVER" not in log

    # release: dhclient unicasts DHCPRELEASE from the address
    client.ip("addr", "add", f"{ip}/24", "dev", "eth0")
    dhclient("-r")
    deadline = time.monotonic() + 5
    while store.leases()[0].state != "released":
        assert time.monotonic() < deadline, store.leases()
        time.sleep(0.05)
    store.close()


@pytest.mark.peer
def test_udhcpc_renews_and_releases(segment):
    segment.full("--lease-time", "600")
    client = segment.client("renew")
    out = segment.tmp / "udhcpc-renew"
    argv = ["udhcpc", "-f", "-i", "eth0", "-s", str(segment.script), "-t", "5", "-T", "1"]
    proc = segment.popen(
        client, argv, segment.tmp / "udhcpc.log", env={**os.environ, "OUT": str(out)}
    )
    bound = out.with_name(out.name + ".bound")
    renew = out.with_name(out.name + ".renew")
    wait_for(bound.exists, "udhcpc to bind")
    ip = read_env(bound)["ip"]

    proc.send_signal(signal.SIGUSR1)  # renew: unicast DHCPREQUEST from the address
    wait_for(renew.exists, "udhcpc to renew")
    assert read_env(renew)["ip"] == ip

    proc.send_signal(signal.SIGUSR2)  # release
    store = segment.store()
    wait_for(lambda: store.leases() and store.leases()[0].state == "released", "the release")
    store.close()
    stop_process(proc)


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.peer
def test_a_known_node_is_tied_by_its_uuid_and_keeps_its_address(segment):
    guid = uuid.UUID("4c4c4544-0042-3510-8052-b4c04f4d3232")
    segment.state.mkdir(parents=True)
    store = segment.store()
    node = store.create_node(guid=str(guid), bmc=BmcAddress("127.0.0.9"), state=NodeState.ENROLLED)
    server = segment.full()
    client = segment.client("node")
    mac = segment.mac(client)

    got = segment.udhcpc(client, *PXE_BIOS, "-x", f"0x61:00{guid.bytes_le.hex()}")
    assert got["bootfile"] == "undionly.kpxe"
    assert got.get("hostname") == node.id

    assert store.get_node(node.id).state is NodeState.BOOTING
    events = store.events(node.id)
    kinds = {e.kind for e in events}
    assert {"dhcp.offer", "dhcp.request", "dhcp.ack"} <= kinds
    assert any(e.kind == "state" and "dhcp.discover" in e.message for e in events)
    ack = next(e for e in events if e.kind == "dhcp.ack")
    assert (
        ack.data["ip"] == got["ip"] and ack.data["arch"] == "bios" and ack.data["client"] == "pxe"
    )
    assert store.reservations() == {mac: got["ip"]}
    assert store.macs(node.id)[0]["mac"] == mac

    # the reservation holds across a restart, even with the lease released and forgotten
    server.stop()
    store.delete_lease(got["ip"])
    segment.full()
    assert segment.udhcpc(client, *PXE_BIOS)["ip"] == got["ip"]
    store.close()


# -- proxy mode ---------------------------------------------------------------------------------


@pytest.mark.peer
def test_proxy_mode_next_to_dnsmasq(segment):
    other = segment.lab.namespace("dnsmasq")
    segment.lab.link(segment.switch, segment.bridge, other, "eth0", address=f"{segment.net}.2/24")
    segment.dnsmasq(other)
    segment.serve("--mode", "proxy")
    client = segment.client("pxe")
    mac = segment.mac(client)

    sniffer = client.popen(
        [sys.executable, str(segment.helper_path), "sniff", "eth0", "15"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    segment.procs.append(sniffer)
    assert sniffer.stdout.readline().strip() == "ready"
    # udhcpc is no PXE client: it takes the first offer, and if that is the proxy's
    # (no address) its request goes unanswered and it starts over -- hence retry
    got = segment.udhcpc(client, *PXE_BIOS, "-O", "bootfile", retry=True)
    seen = json.loads(sniffer.stdout.readline())
    sniffer.wait(10)

    # the address came from dnsmasq ...
    assert got["serverid"] == f"{segment.net}.2"
    assert 50 <= int(got["ip"].rsplit(".", 1)[1]) <= 99
    offers = [s for s in seen if s["type"] == "OFFER"]
    dnsmasq_offer = next(s for s in offers if s["server_id"] == f"{segment.net}.2")
    assert dnsmasq_offer["yiaddr"] == got["ip"]
    # ... and the boot options from metalseed's proxy offer, without an address
    proxy = next(s for s in offers if s["server_id"] == segment.seed_ip)
    assert proxy["yiaddr"] == "0.0.0.0"
    assert proxy["bootfile"] == "undionly.kpxe" and proxy["vendor"] == "PXEClient"
    assert proxy["siaddr"] == segment.seed_ip

    # the PXE client then asks the proxy on port 4011, from its new address
    answer = json.loads(
        segment.helper(client, "proxy-request", "eth0", segment.seed_ip, mac, got["ip"])
    )
    assert answer == {"src": segment.seed_ip, "sport": 4011, "type": "ACK", "file": "undionly.kpxe"}

    # a client that is not netbooting gets nothing from the proxy
    plain = segment.client("plain")
    assert segment.udhcpc(plain)["serverid"] == f"{segment.net}.2"


@pytest.mark.peer
def test_full_mode_refuses_a_segment_with_another_dhcp_server(segment):
    other = segment.lab.namespace("dnsmasq")
    segment.lab.link(segment.switch, segment.bridge, other, "eth0", address=f"{segment.net}.2/24")
    segment.dnsmasq(other)

    refused = segment.serve("--pool", segment.pool, "--probe-seconds", "1", ready=False)
    assert refused.proc.wait(10) == 78  # ConfigError
    text = refused.text()
    assert "another DHCP server answers on prov0" in text and f"{segment.net}.2" in text
    assert "--force" in text and "Traceback" not in text

    forced = segment.serve("--pool", segment.pool, "--force")
    assert forced.proc.poll() is None


# -- IPv6 RA, junk, other interfaces ------------------------------------------------------------


def wait_link_local(ns: Netns, ifname: str) -> None:
    def ready() -> bool:
        out = ns.ip("-6", "addr", "show", "dev", ifname, "scope", "link").stdout
        return "inet6 fe80" in out and "tentative" not in out

    wait_for(ready, f"a link-local address on {ns.name}/{ifname}")


def test_router_solicitations_get_an_advertisement_to_all_nodes(segment):
    segment.serve("--mode", "proxy")
    client = segment.client("v6")
    wait_link_local(segment.seed, "prov0")
    wait_link_local(client, "eth0")
    ra = json.loads(segment.helper(client, "rs", "eth0"))
    assert ra is not None, "no router advertisement"
    assert ra["dst_mac"] == "33:33:00:00:00:01" and ra["dst"] == "ff02::1"
    assert ra["src"].startswith("fe80:") and ra["hlim"] == 255
    assert ra["lifetime"] == 0  # we are not a router


@pytest.mark.peer
def test_junk_on_port_67_is_dropped_and_service_goes_on(segment):
    server = segment.full()
    noisy = segment.client("noisy", address=f"{segment.net}.250/24")
    assert "sent" in segment.helper(noisy, "garbage", "60", segment.seed_ip)
    client = segment.client("after")
    assert in_pool(segment, segment.udhcpc(client, *PXE_BIOS)["ip"])
    text = server.text()
    assert "dropped a bad packet" in text
    assert text.count("dropped a bad packet") <= 5  # rate-limited
    assert "Traceback" not in text
    assert server.proc.poll() is None


@pytest.mark.peer
def test_a_client_on_another_interface_gets_no_answer(segment):
    lab = segment.lab
    bridge2 = lab.bridge(segment.switch, "br1")
    lab.link(segment.switch, bridge2, segment.seed, "other0", address="10.250.0.1/24")
    segment.full()
    outside = segment.client("outside", bridge=bridge2)
    argv = ["-t", "2", "-T", "1"]
    assert segment.udhcpc(outside, *PXE_BIOS, *argv, check=False) == {}
    inside = segment.client("inside")
    assert in_pool(segment, segment.udhcpc(inside, *PXE_BIOS)["ip"])
