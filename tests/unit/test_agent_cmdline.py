"""The agent's kernel command line: what the seed's iPXE script puts there, parsed."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootstrap.agent.cmdline import (
    CmdlineError,
    Token,
    cmdline_values,
    parse_boot_params,
    split_cmdline,
)

TOKEN = "tok3n_Example-0123456789abcdefghijklmnopqrstu"
PROVISION = (
    "initrd=initrd console=ttyS0,115200n8 quiet BOOTIF=01-52-54-00-12-34-56 "
    "metalseed.url=http://10.20.0.1:8080 metalseed.node=node-6f1c3e2a "
    f"metalseed.token={TOKEN} metalseed.mac=52:54:00:12:34:56 "
    "metalseed.rootfs=http://10.20.0.1:8080/images/x/rootfs.squashfs?mac=52-54-00-12-34-56\n"
)
ENLIST = (
    "initrd=initrd BOOTIF=01-52-54-00-12-34-56 metalseed.url=http://10.20.0.1 "
    f"metalseed.mode=enlist metalseed.token={TOKEN} metalseed.mac=52:54:00:12:34:56"
)


def test_a_provision_command_line():
    params = parse_boot_params(PROVISION)
    assert params.url == "http://10.20.0.1:8080"
    assert params.enlist_url == "http://10.20.0.1:8080/api/v1/enlist"
    assert (params.node, params.mac, params.enlist_mode) == (
        "node-6f1c3e2a",
        "52:54:00:12:34:56",
        False,
    )
    assert params.token.reveal() == TOKEN


def test_an_enlist_command_line_has_no_node():
    params = parse_boot_params(ENLIST + " metalseed.node=node-x")
    assert params.enlist_mode and params.node is None


def test_bootif_stands_in_for_a_missing_mac():
    params = parse_boot_params(ENLIST.replace(" metalseed.mac=52:54:00:12:34:56", ""))
    assert params.mac == "52:54:00:12:34:56"


def test_the_kernels_quoting():
    assert split_cmdline('a="b c" d  e="" "f g"=h\n') == ["a=b c", "d", "e=", "f g=h"]
    assert cmdline_values("x=1 x=2 y z=a=b") == {"x": "2", "z": "a=b"}


@pytest.mark.parametrize(
    "text, says",
    [
        (PROVISION.replace("metalseed.url=http://10.20.0.1:8080", ""), "metalseed.url"),
        (PROVISION.replace(f"metalseed.token={TOKEN}", ""), "metalseed.token"),
        (PROVISION.replace("metalseed.url=http://", "metalseed.url=ftp://"), "http"),
        (PROVISION.replace("metalseed.mac=52:54:00:12:34:56", "metalseed.mac=zz"), "MAC"),
        (
            PROVISION.replace("metalseed.mac=52:54:00:12:34:56", "").replace(
                "BOOTIF=01-52-54-00-12-34-56", ""
            ),
            "metalseed.mac",
        ),
        (PROVISION + " metalseed.mode=rescue", "metalseed.mode"),
        (PROVISION.replace("node-6f1c3e2a", "node/../x"), "metalseed.node"),
    ],
)
def test_what_is_missing_or_wrong_is_said(text, says):
    with pytest.raises(CmdlineError, match=says):
        parse_boot_params(text)


def test_a_malformed_token_is_refused_without_showing_it():
    bad = "sec ret;" + "x" * 20
    with pytest.raises(CmdlineError) as info:
        parse_boot_params(PROVISION.replace(TOKEN, f'"{bad}"'))
    assert "sec ret" not in str(info.value)


def test_the_token_never_shows_itself():
    params = parse_boot_params(PROVISION)
    for text in (repr(params), str(params), f"{params.token}", repr(params.token)):
        assert TOKEN not in text
    with pytest.raises(TypeError):
        pickle.dumps(params.token)
    assert Token(TOKEN) == params.token


@given(st.text(max_size=300))
def test_any_text_parses_or_says_why(text):
    try:
        params = parse_boot_params(text)
    except CmdlineError:
        return
    assert params.url.startswith("http") and params.token.reveal()


@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20), max_size=10
    )
)
def test_plain_words_survive_the_split(words):
    plain = [w for w in ("".join(c for c in w if not c.isspace() and c != '"') for w in words) if w]
    assert split_cmdline(" ".join(plain)) == plain
