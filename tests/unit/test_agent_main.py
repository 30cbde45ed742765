"""The agent end to end in-process against a stand-in seed on loopback: flow and exit codes.

Plus the promise the image depends on: ``bootstrap/__init__.py`` and
``bootstrap/agent/*.py`` alone run under Debian's ``/usr/bin/python3``.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.agent.main import main
from tests.unit.test_agent_inventory import BOOT_ID, GUID, machine_tree

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok3n_Example-0123456789abcdefghijklmnopqrstu"
MAC = "52:54:00:12:34:56"
ANSWER = {
    "node": "node-6f1c3e2a",
    "state": "enlisted",
    "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGvc0ZKh3jzX metalseed"],
    "time_servers": ["127.0.0.1"],
    "provisioning_cidr": "127.0.0.0/8",
    "hostname": "node-6f1c3e2a",
}


class StandIn(http.server.BaseHTTPRequestHandler):
    reply: tuple[int, bytes] = (200, json.dumps(ANSWER).encode())
    seen: list = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        status, payload = self.reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def seed() -> Iterator[str]:
    StandIn.seen = []
    StandIn.reply = (200, json.dumps(ANSWER).encode())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def agent(tmp_path: Path, url: str, *extra: str, cmdline: str | None = None) -> int:
    roots = machine_tree(tmp_path / "machine")
    line = (
        cmdline
        if cmdline is not None
        else (
            f"BOOTIF=01-52-54-00-12-34-56 metalseed.url={url} metalseed.node=node-6f1c3e2a "
            f"metalseed.token={TOKEN} metalseed.mac={MAC}"
        )
    )
    (tmp_path / "cmdline").write_text(line + "\n")
    args = ["--cmdline", str(tmp_path / "cmdline"), "--root", str(tmp_path / "root")]
    args += ["--sys-root", str(roots.sys), "--proc-root", str(roots.proc)]
    args += ["--dev-root", str(roots.dev), "--attempts", "2", "--backoff", "0.01"]
    return main([*args, *extra])


def test_enlists_and_applies(tmp_path, seed, capfd):
    assert agent(tmp_path, seed) == 0
    [(path, auth, body)] = StandIn.seen
    assert path == "/api/v1/enlist" and auth == f"Bearer {TOKEN}"
    assert (body["mac"], body["node"], body["boot_id"]) == (MAC, "node-6f1c3e2a", BOOT_ID)
    assert body["inventory"]["system"]["uuid"] == GUID
    assert {d["name"] for d in body["inventory"]["disks"]} >= {"vda", "loop0"}
    root = tmp_path / "root"
    assert json.loads((root / "run/metalseed/enlist.json").read_text()) == ANSWER
    assert ANSWER["ssh_authorized_keys"][0] in (root / "root/.ssh/authorized_keys").read_text()
    assert (root / "proc/sys/kernel/hostname").read_text() == "node-6f1c3e2a\n"  # no commands
    err = capfd.readouterr().err
    assert "enlisted as node-6f1c3e2a" in err and TOKEN not in err


def test_only_named_disks(tmp_path, seed):
    assert agent(tmp_path, seed, "--disks", "vda") == 0
    assert [d["name"] for d in StandIn.seen[0][2]["inventory"]["disks"]] == ["vda"]


@pytest.mark.parametrize("status, code", [(401, 77), (403, 77), (400, 65), (404, 65)])
def test_refusals_are_final_with_their_own_exit_codes(tmp_path, seed, status, code, capfd):
    StandIn.reply = (status, b'{"error": "the token was used already (replay)"}')
    assert agent(tmp_path, seed) == code
    assert len(StandIn.seen) == 1  # not retried
    err = capfd.readouterr().err
    assert "the token was used already" in err and TOKEN not in err
    assert not (tmp_path / "root/run/metalseed/enlist.json").exists()


def test_a_seed_that_keeps_failing_is_given_up_on(tmp_path, seed):
    StandIn.reply = (503, b'{"error": "busy"}')
    assert agent(tmp_path, seed) == 75
    assert len(StandIn.seen) == 2


def test_an_unreachable_seed_is_given_up_on(tmp_path, capfd):
    assert agent(tmp_path, "http://127.0.0.1:9") == 75  # discard port: nothing listens
    assert "cannot reach the seed" in capfd.readouterr().err


def test_an_unusable_answer(tmp_path, seed):
    StandIn.reply = (200, json.dumps({**ANSWER, "hostname": "no good"}).encode())
    assert agent(tmp_path, seed) == 65


@pytest.mark.parametrize(
    "cmdline",
    [
        "metalseed.url=http://127.0.0.1:9 metalseed.mac=52:54:00:12:34:56",  # no token
        f"metalseed.token={TOKEN} metalseed.mac=52:54:00:12:34:56",  # no url
    ],
)
def test_a_command_line_without_url_or_token_is_a_usage_error(tmp_path, cmdline, capfd):
    assert agent(tmp_path, "", cmdline=cmdline) == 64
    assert "metalseed." in capfd.readouterr().err


def test_no_command_line_file(tmp_path):
    assert main(["--cmdline", str(tmp_path / "absent")]) == 64


def test_no_boot_id(tmp_path, seed):
    roots = machine_tree(tmp_path / "machine")
    (roots.proc / "sys/kernel/random/boot_id").unlink()
    (tmp_path / "cmdline").write_text(
        f"metalseed.url={seed} metalseed.token={TOKEN} BOOTIF=01-{MAC.replace(':', '-')}"
    )
    args = ["--cmdline", str(tmp_path / "cmdline"), "--proc-root", str(roots.proc)]
    assert main([*args, "--root", str(tmp_path / "root")]) == 74
    assert StandIn.seen == []


def test_a_failing_firewall_command_fails_the_run(tmp_path, seed, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, status in (("nft", 1), ("chronyc", 0), ("hostnamectl", 0)):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "$0 $*" >> {tmp_path}/ran\nexit {status}\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert agent(tmp_path, seed, "--commands", "run") == 70
    ran = (tmp_path / "ran").read_text()
    assert "nft add element inet metalseed provisioning { 127.0.0.0/8 }" in ran
    assert "hostnamectl set-hostname node-6f1c3e2a" in ran


def test_inventory_only_needs_no_seed(tmp_path, capsys):
    roots = machine_tree(tmp_path)
    argv = ["--inventory-only", "--sys-root", str(roots.sys), "--proc-root", str(roots.proc)]
    assert main([*argv, "--dev-root", str(roots.dev)]) == 0
    assert json.loads(capsys.readouterr().out)["system"]["uuid"] == GUID


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs Debian's python3")
def test_the_agent_runs_from_its_own_files_on_the_plain_system_python(tmp_path):
    """What the image gets: bootstrap/__init__.py + bootstrap/agent/*.py, stdlib only."""
    lib = tmp_path / "usr/lib/metalseed"
    (lib / "bootstrap/agent").mkdir(parents=True)
    shutil.copy(REPO / "bootstrap/__init__.py", lib / "bootstrap/__init__.py")
    for source in (REPO / "bootstrap/agent").glob("*.py"):
        shutil.copy(source, lib / "bootstrap/agent" / source.name)
    roots = machine_tree(tmp_path / "machine")
    check = (
        "import sys, runpy; sys.argv = ['agent', '--inventory-only', '--sys-root', sys.argv[1],"
        " '--proc-root', sys.argv[2], '--dev-root', sys.argv[3]]\n"
        "try:\n    runpy.run_module('bootstrap.agent', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "extra = sorted(top - set(sys.stdlib_module_names) - {'bootstrap', '__main__'})\n"
        "sys.stderr.write('NONSTDLIB ' + ' '.join(extra) + '\\n')\n"
    )
    proc = subprocess.run(
        [
            "/usr/bin/python3",
            "-E",
            "-s",
            "-S",
            "-c",
            check,
            str(roots.sys),
            str(roots.proc),
            str(roots.dev),
        ],
        cwd=lib,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cpus"]["count"] == 4
    assert proc.stderr.strip().splitlines()[-1] == "NONSTDLIB", proc.stderr
    assert sys.version_info >= (3, 11)
