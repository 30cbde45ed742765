"""The iPXE interpreter: every script metalseed emits, run against fake actions.

The scripts are the expected files of ``test_ipxe_scripts.py`` (what the
templates render), so a template change that the lab machines would not
understand fails here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bootstrap.lab.ipxe import (
    CommandFailed,
    Image,
    Interpreter,
    IpxeError,
    LoopGuard,
    NotAScript,
    ScriptFailed,
    Status,
    expand,
    parse,
    split_words,
)

DATA = Path(__file__).parent / "data" / "ipxe"
SEED = "http://10.20.0.1:8080"
MAC = "52:54:00:12:34:56"
UUID = "6f1c3e2a-58d4-4b7e-9a15-2c7d0e8b4f93"
SETTINGS = {"mac": MAC, "uuid": UUID, "ip": "10.20.0.100"}
SCRIPT_URL = f"{SEED}/boot/52-54-00-12-34-56.ipxe?uuid={UUID}"
KERNEL_URL = f"{SEED}/images/debian-12-20250101/vmlinuz?mac=52-54-00-12-34-56"
INITRD_URL = f"{SEED}/images/debian-12-20250101/initrd?mac=52-54-00-12-34-56"


def script(name: str) -> str:
    return (DATA / name).read_text()


class Fake:
    """Actions that record every call; ``fail`` maps a URL to how many fetches of it fail."""

    def __init__(self, scripts: dict[str, str] | None = None, *, poweroff: bool = False) -> None:
        self.scripts = scripts or {}
        self.fail: dict[str, int] = {}
        self.boot_fails = 0
        self.can_poweroff = poweroff
        self.calls: list[tuple] = []

    def fetch(self, url: str, name: str):
        self.calls.append(("fetch", url, name))
        if self.fail.get(url, 0) > 0:
            self.fail[url] -= 1
            raise CommandFailed(f"sha256 mismatch for {url}")
        return f"handle:{name}"

    def fetch_script(self, url: str) -> str:
        self.calls.append(("fetch_script", url))
        if url not in self.scripts:
            raise CommandFailed(f"{url}: 404 Not Found")
        return self.scripts[url]

    def sleep(self, seconds: float) -> None:
        self.calls.append(("sleep", seconds))

    def echo(self, text: str) -> None:
        self.calls.append(("echo", text))

    def boot(self, kernel: Image, initrds, cmdline: str) -> None:
        self.calls.append(("boot", kernel.name, tuple(i.name for i in initrds), cmdline))
        if self.boot_fails > 0:
            self.boot_fails -= 1
            raise CommandFailed("rootfs sha256 mismatch")

    def poweroff(self) -> None:
        self.calls.append(("poweroff",))
        if not self.can_poweroff:
            raise CommandFailed("Operation not supported")

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


def kernel_args(name: str) -> str:
    [line] = [x for x in script(name).splitlines() if x.startswith("kernel ")]
    return line.split(" ", 4)[4].removesuffix(" || goto failed")


# -- the expected scripts ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["enlist.ipxe", "provision.ipxe", "provision-with-rootfs.ipxe"])
def test_a_boot_script_fetches_kernel_and_initrd_and_boots(name):
    fake = Fake()
    outcome = Interpreter(fake, SETTINGS).run(script(name), name)
    assert outcome.status is Status.BOOTED
    assert fake.kinds() == ["echo", "fetch", "fetch", "boot"]
    assert fake.of("fetch") == [("fetch", KERNEL_URL, "kernel"), ("fetch", INITRD_URL, "initrd")]
    cmdline = kernel_args(name)
    assert fake.of("boot") == [("boot", "kernel", ("initrd",), cmdline)]
    assert outcome.cmdline == cmdline and outcome.kernel.handle == "handle:kernel"
    assert [i.name for i in outcome.initrds] == ["initrd"]
    assert outcome.failures == () and outcome.chains == 0
    assert "metalseed.url=http://10.20.0.1:8080" in cmdline


def test_the_rootfs_is_on_the_command_line_for_the_firmware_to_fetch():
    outcome = Interpreter(Fake(), SETTINGS).run(script("provision-with-rootfs.ipxe"))
    assert "metalseed.rootfs=http://10.20.0.1:8080/images/debian-12-20250101/rootfs" in (
        outcome.cmdline
    )
    assert "metalseed.rootfs_sha256=" + "c" * 64 in outcome.cmdline


def test_a_failed_download_waits_and_chains_to_the_script_again():
    text = script("provision.ipxe")
    fake = Fake({SCRIPT_URL: text})
    fake.fail[KERNEL_URL] = 1  # e.g. a tampered kernel
    outcome = Interpreter(fake, SETTINGS).run(text)
    assert outcome.status is Status.BOOTED
    assert fake.kinds() == [
        "echo",
        "fetch",  # fails
        "echo",
        "sleep",
        "fetch_script",
        "echo",
        "fetch",
        "fetch",
        "boot",
    ]
    assert fake.of("sleep") == [("sleep", 30.0)]
    assert fake.of("fetch_script") == [("fetch_script", SCRIPT_URL)]
    assert (
        "booting image debian-12-20250101 failed, asking again in 30 seconds"
        in fake.of("echo")[1][1]
    )
    assert outcome.chains == 1
    assert len(outcome.failures) == 1 and "sha256 mismatch" in outcome.failures[0]
    assert "line 5: kernel:" in outcome.failures[0]


@pytest.mark.parametrize("failing", [INITRD_URL, "boot"])
def test_a_failed_initrd_or_boot_takes_the_same_path(failing):
    text = script("enlist.ipxe")
    fake = Fake({SCRIPT_URL: text})
    if failing == "boot":
        fake.boot_fails = 1
    else:
        fake.fail[failing] = 1
    outcome = Interpreter(fake, SETTINGS).run(text)
    assert outcome.status is Status.BOOTED and outcome.chains == 1
    assert len(fake.of("boot")) == (2 if failing == "boot" else 1)


def test_a_script_that_chains_forever_is_stopped_by_the_guard():
    text = script("provision.ipxe")
    fake = Fake({SCRIPT_URL: text})
    fake.fail[KERNEL_URL] = 10**6
    with pytest.raises(LoopGuard, match="chained 3 times without booting") as info:
        Interpreter(fake, SETTINGS, max_chains=3).run(text)
    assert "sha256 mismatch" in str(info.value)  # the last failure, said
    assert len(fake.of("sleep")) == 4 and len(fake.of("fetch_script")) == 3


def test_no_image_waits_then_chains_to_what_the_seed_says_next():
    fake = Fake({SCRIPT_URL: script("enlist.ipxe")})
    outcome = Interpreter(fake, SETTINGS).run(script("no-image.ipxe"))
    assert outcome.status is Status.BOOTED
    echoes = [c[1] for c in fake.of("echo")]
    assert echoes[:2] == [
        "metalseed: no current boot image on the seed yet",
        "metalseed: asking again in 30 seconds",
    ]
    assert fake.kinds()[:4] == ["echo", "echo", "sleep", "fetch_script"]


def test_the_entry_script_expands_mac_and_uuid():
    fake = Fake({SCRIPT_URL: script("provision.ipxe")})
    outcome = Interpreter(fake, SETTINGS).run(script("chain.ipxe"))
    assert outcome.status is Status.BOOTED
    assert fake.of("fetch_script") == [("fetch_script", SCRIPT_URL)]


def test_a_retired_machine_powers_off_where_it_can():
    fake = Fake(poweroff=True)
    outcome = Interpreter(fake, SETTINGS).run(script("retired.ipxe"))
    assert outcome.status is Status.POWEROFF
    assert fake.kinds() == ["echo", "poweroff"]


def test_a_retired_machine_without_poweroff_idles_until_the_step_guard():
    fake = Fake(poweroff=False)
    with pytest.raises(LoopGuard, match="more than 50 commands"):
        Interpreter(fake, SETTINGS, max_steps=50).run(script("retired.ipxe"))
    assert fake.of("sleep")[:3] == [("sleep", 3600.0)] * 3


@pytest.mark.parametrize("path", sorted(DATA.glob("*.ipxe")), ids=lambda p: p.name)
def test_every_expected_script_parses_and_runs(path):
    fake = Fake({SCRIPT_URL: script("provision.ipxe")}, poweroff=True)
    program = parse(path.read_text(), path.name)
    assert program.lines
    outcome = Interpreter(fake, SETTINGS).run(path.read_text(), path.name)
    assert outcome.status in (Status.BOOTED, Status.POWEROFF)


# -- the language ------------------------------------------------------------------------------


def run(text: str, fake: Fake | None = None, **settings: str):
    fake = fake or Fake()
    return Interpreter(fake, {**SETTINGS, **settings}).run("#!ipxe\n" + text), fake


def test_settings_expand_with_scopes_and_types():
    assert expand("${mac}", SETTINGS) == MAC
    assert expand("${net0/mac}", SETTINGS) == MAC
    assert expand("${netX/mac:hexhyp}", SETTINGS) == "52-54-00-12-34-56"
    assert expand("${net0/mac:hexhyp}", SETTINGS) == "52-54-00-12-34-56"
    assert expand("${mac:hex}", SETTINGS) == MAC
    assert expand("a${ip}b${uuid}", SETTINGS) == f"a10.20.0.100b{UUID}"
    assert expand("no settings", SETTINGS) == "no settings"


@pytest.mark.parametrize(
    "word, message",
    [
        ("${hostname}", "unknown setting"),
        ("${net1/mac}", "unknown setting scope"),
        ("${mac:ipv4}", "unknown setting type"),
        ("${ip:hexhyp}", "cannot be shown as hexhyp"),
    ],
)
def test_unknown_settings_are_errors(word, message):
    with pytest.raises(IpxeError, match=message):
        expand(word, SETTINGS)


def test_an_unknown_setting_in_a_script_stops_it():
    with pytest.raises(IpxeError, match=r"unknown setting \$\{serial\}"):
        run("echo ${serial}\n")


@pytest.mark.parametrize(
    "text, message",
    [
        ("imgfetch http://x/y\n", "unknown command 'imgfetch'"),
        ("kernel --timeout 5 http://x/y\n", "unknown option '--timeout'"),
        ("kernel\n", "wrong number of arguments"),
        ("initrd --name\n", "needs a value"),
        ("sleep soon\n", "not a number"),
        ("goto nowhere\n", "no label 'nowhere'"),
        ("echo 'open\n", "unterminated ' quote"),
        ("|| goto x\n:x\n", "without a command"),
        ("boot || goto failed\n:failed\nfrobnicate\n", "unknown command 'frobnicate'"),
        (": bad\n", "bad label"),
    ],
)
def test_what_this_interpreter_cannot_run_is_refused_before_running(text, message):
    fake = Fake()
    with pytest.raises(IpxeError, match=message):
        run(text, fake)
    assert fake.calls == []


def test_text_without_the_ipxe_line_is_not_a_script():
    with pytest.raises(NotAScript):
        Interpreter(Fake(), SETTINGS).run("kernel http://x/y\n")


def test_a_chain_to_a_binary_is_a_failed_command():
    fake = Fake({"http://x/undionly.kpxe": "\x00\x01binary"})
    outcome, _ = run("chain http://x/undionly.kpxe || exit 3\n", fake)
    assert outcome.status is Status.EXITED and outcome.exit_code == 3
    assert "not an iPXE script" in outcome.failures[0]


def test_an_unhandled_failure_ends_the_script():
    fake = Fake()
    fake.fail["http://x/k"] = 1
    with pytest.raises(ScriptFailed, match=r"line 2: kernel: sha256 mismatch.*not handled"):
        run("kernel http://x/k\necho never\n", fake)
    assert "echo" not in fake.kinds()


def test_boot_without_a_kernel_fails():
    outcome, _ = run("boot || exit 7\n")
    assert outcome.exit_code == 7 and "no kernel selected" in outcome.failures[0]


def test_or_and_and_run_left_to_right():
    fake = Fake()
    fake.fail["http://x/a"] = 1
    outcome, fake = run(
        "kernel http://x/a || echo fell back && echo and then\n"
        "echo ok && echo chained\n"
        "exit\n"
        "echo unreachable\n",
        fake,
    )
    assert outcome.status is Status.EXITED and outcome.exit_code == 0
    assert [c[1] for c in fake.of("echo")] == ["fell back", "and then", "ok", "chained"]


def test_quotes_escapes_and_echo_n():
    assert split_words(r'echo "a  b" c\ d ' + "'e f'") == ["echo", "a  b", "c d", "e f"]
    _, fake = run('echo -n "two  spaces" ${ip}\n')
    assert fake.of("echo") == [("echo", "two  spaces 10.20.0.100")]


def test_a_new_image_replaces_one_of_the_same_name_and_names_default_to_the_file():
    outcome, fake = run(
        "kernel http://x/img/vmlinuz?mac=1 quiet\n"
        "initrd http://x/img/initrd.gz\n"
        "initrd --name initrd.gz http://x/other/initrd.gz\n"
        "initrd -n extra http://x/extra\n"
        "boot\n"
    )
    assert outcome.status is Status.BOOTED
    assert fake.of("boot") == [("boot", "vmlinuz", ("initrd.gz", "extra"), "quiet")]
    assert [i.url for i in outcome.initrds] == ["http://x/other/initrd.gz", "http://x/extra"]


def test_chain_without_replace_returns_to_the_caller_on_exit():
    fake = Fake({"http://x/sub.ipxe": "#!ipxe\necho in sub\nexit\n"})
    outcome, fake = run("chain http://x/sub.ipxe\necho back\n", fake)
    assert outcome.status is Status.EXITED
    assert [c[1] for c in fake.of("echo")] == ["in sub", "back"]


def test_a_missing_chained_script_is_a_failed_command():
    outcome, fake = run("chain --autofree http://x/missing.ipxe || goto nope\nexit 1\n:nope\n")
    assert outcome.status is Status.EXITED and outcome.exit_code == 0
    assert "404" in outcome.failures[0]
