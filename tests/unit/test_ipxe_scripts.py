"""iPXE boot scripts: rendered byte for byte as the expected files in data/ipxe/.

The expected files were checked by hand once (and booted by Debian's iPXE in
QEMU); they are fixtures, so any template change shows up here as a diff.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from bootstrap.boot.backend import BootProfile, Machine
from bootstrap.boot.scripts import (
    ScriptError,
    ScriptRenderer,
    hyphen_mac,
    parse_mac,
    script_path,
)
from bootstrap.config import BootConfig
from bootstrap.image.catalogue import Image, ImageFile
from bootstrap.models import Secret
from bootstrap.states import NodeState

DATA = Path(__file__).parent / "data" / "ipxe"
SEED = "http://10.20.0.1:8080"
MAC = "52:54:00:12:34:56"
TOKEN = Secret("tok3n_Example-0123456789abcdefghijklmnopqrstu")
CONFIG = BootConfig(kernel_args="quiet panic=30")

UNKNOWN = Machine(MAC, None, None, BootProfile.ENLIST)
KNOWN = Machine(MAC, "node-6f1c3e2a", NodeState.ENROLLED, BootProfile.PROVISION, "node-6f1c3e2a")
RETIRED = Machine(MAC, "node-6f1c3e2a", NodeState.RETIRED, BootProfile.RETIRED, "node-6f1c3e2a")


def image(*names: str, cmdline: str = "console=ttyS0,115200n8 loglevel=4") -> Image:
    files = {
        name: ImageFile(name, f"{i:x}" * 64, 1000 + i) for i, name in enumerate(names, start=10)
    }
    return Image("debian-12-20250101", Path("/nonexistent"), files, cmdline=cmdline)


BASIC = image("vmlinuz", "initrd")
WITH_ROOTFS = image("vmlinuz", "initrd", "rootfs.squashfs")


def assert_matches(name: str, text: str) -> None:
    expected = (DATA / name).read_text()
    if text != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            text.splitlines(keepends=True),
            f"expected/{name}",
            f"rendered/{name}",
        )
        pytest.fail("rendered script differs from the fixture:\n" + "".join(diff))


@pytest.fixture(scope="module")
def renderer() -> ScriptRenderer:
    return ScriptRenderer()


def test_unknown_machine_gets_the_enlist_script(renderer):
    script = renderer.render(UNKNOWN, BASIC, seed_url=SEED, config=CONFIG)
    assert (script.profile, script.image) == ("enlist", BASIC.name)
    assert_matches("enlist.ipxe", script.text)


def test_known_node_gets_the_provision_script_with_its_token(renderer):
    script = renderer.render(KNOWN, BASIC, seed_url=SEED, config=CONFIG, token=TOKEN)
    assert script.profile == "provision"
    assert_matches("provision.ipxe", script.text)


def test_an_image_with_a_rootfs_names_it_and_its_checksum(renderer):
    script = renderer.render(KNOWN, WITH_ROOTFS, seed_url=SEED, config=CONFIG, token=TOKEN)
    assert_matches("provision-with-rootfs.ipxe", script.text)


def test_retired_node_boots_nothing(renderer):
    script = renderer.render(RETIRED, BASIC, seed_url=SEED, config=CONFIG, token=TOKEN)
    assert (script.profile, script.image) == ("retired", None)
    assert TOKEN.reveal() not in script.text
    assert_matches("retired.ipxe", script.text)


def test_no_image_yet_waits_and_asks_again(renderer):
    script = renderer.render(UNKNOWN, None, seed_url=SEED, config=CONFIG)
    assert script.profile == "no-image"
    assert_matches("no-image.ipxe", script.text)


def test_fixed_entry_script_chains_to_the_per_mac_one(renderer):
    assert_matches("chain.ipxe", renderer.chain(seed_url=SEED))


def test_an_image_without_kernel_is_treated_like_no_image(renderer):
    script = renderer.render(KNOWN, image("initrd"), seed_url=SEED, config=CONFIG, token=TOKEN)
    assert script.profile == "no-image"
    assert "has no vmlinuz" in script.reason
    assert TOKEN.reveal() not in script.text


def test_the_retry_delay_is_a_parameter(renderer):
    script = renderer.render(UNKNOWN, None, seed_url=SEED, config=CONFIG, retry_seconds=3)
    assert "sleep 3\n" in script.text


def test_script_repr_never_shows_the_token(renderer):
    script = renderer.render(KNOWN, BASIC, seed_url=SEED, config=CONFIG, token=TOKEN)
    assert TOKEN.reveal() in script.text
    assert TOKEN.reveal() not in repr(script)


def test_provision_without_a_token_is_an_error(renderer):
    with pytest.raises(ScriptError):
        renderer.render(KNOWN, BASIC, seed_url=SEED, config=CONFIG)


@pytest.mark.parametrize(
    "cmdline", ["root=${evil}", 'init="/bin/sh x"', "a\\b", "x ||", "console=tty0 $(reboot)"]
)
def test_kernel_arguments_ipxe_would_misread_are_refused(renderer, cmdline):
    with pytest.raises(ScriptError):
        renderer.render(
            UNKNOWN, image("vmlinuz", "initrd", cmdline=cmdline), seed_url=SEED, config=CONFIG
        )


def test_templates_use_strict_undefined(tmp_path):
    (tmp_path / "retired.ipxe.j2").write_text("#!ipxe\necho {{ no_such_variable }}\n")
    with pytest.raises(Exception, match="no_such_variable"):
        ScriptRenderer(tmp_path).render(RETIRED, BASIC, seed_url=SEED, config=CONFIG)


@pytest.mark.parametrize(
    "text", ["52-54-00-12-34-56", "52:54:00:12:34:56", "52-54-00-12-34-56".upper()]
)
def test_mac_in_a_url_parses_in_both_ipxe_forms(text):
    assert parse_mac(text) == MAC


@pytest.mark.parametrize(
    "text",
    ["525400123456", "52-54:00-12-34-56", "52-54-00-12-34", "zz52-54-00-12-34-56", "", "../x"],
)
def test_anything_else_is_not_a_mac(text):
    with pytest.raises(ValueError):
        parse_mac(text)


def test_url_helpers():
    assert hyphen_mac(MAC) == "52-54-00-12-34-56"
    assert script_path(MAC) == "/boot/52-54-00-12-34-56.ipxe"
