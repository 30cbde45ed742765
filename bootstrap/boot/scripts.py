"""iPXE boot scripts, rendered from the jinja2 templates in ``pxe/``.

Rendering is pure: the script is a function of the machine (``Machine`` from
the backend), the image (or its absence), the seed's URL, the token and the
boot config, so tests compare it byte for byte with expected files. What a
machine is told to do, by profile:

* ``ENLIST`` (an unknown MAC): the current image in enlist-only mode,
  ``metalseed.mode=enlist`` on the kernel command line and no node id.
* ``PROVISION`` (a known node): the current image with the node id and its
  one-time join token, ``metalseed.url/node/token/mac`` and ``BOOTIF``.
* ``RETIRED``: print why, power off (or idle), boot nothing.
* no image yet (or an image without a kernel): print why, wait, fetch the
  script again -- a machine powered on before the image exists recovers.

Kernel and initrd URLs name the concrete image (not ``current``), so a
machine halfway through its downloads never mixes two images, and carry
``?mac=`` so the HTTP server can put each download on the right node without
a lease lookup. The rendered text is the only place a token is revealed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path

import jinja2

from ..config import BootConfig
from ..errors import FatalError
from ..image.catalogue import Image
from ..models import Secret
from .backend import BootProfile, Machine

#: the templates live at the repository root, next to ``bootstrap/``
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "pxe"
#: file names an image's manifest uses for what the scripts boot
KERNEL, INITRD, ROOTFS = "vmlinuz", "initrd", "rootfs.squashfs"
#: seconds a machine waits before asking again (no image yet, or a failed download)
RETRY_SECONDS = 30

_MAC = re.compile(r"^[0-9a-fA-F]{2}([-:])[0-9a-fA-F]{2}(?:\1[0-9a-fA-F]{2}){4}$")
#: characters iPXE's command parser would act on inside a kernel argument
#: (settings expansion, quoting, escapes) or that no kernel argument needs
_UNSAFE_ARG = re.compile(r"[$\"'\\\s]|[^\x21-\x7e]")


class ScriptError(FatalError):
    """A boot script cannot be rendered (a kernel argument iPXE would misread)."""


def parse_mac(text: str) -> str:
    """``52-54-00-AB-CD-EF`` or ``52:54:00:ab:cd:ef`` -> ``52:54:00:ab:cd:ef``; else ValueError.

    Stricter than ``backend.normalise_mac``: this parses a URL path segment,
    so only the two forms iPXE produces (``${mac}``, ``${mac:hexhyp}``) pass.
    """
    if not _MAC.match(text):
        raise ValueError(f"not a MAC address: {text[:40]!r}")
    return text.lower().replace("-", ":")


def hyphen_mac(mac: str) -> str:
    """``52:54:00:ab:cd:ef`` -> ``52-54-00-ab-cd-ef`` (URLs, ``BOOTIF``)."""
    return mac.lower().replace(":", "-")


def script_path(mac: str) -> str:
    """The URL path of a machine's boot script: ``/boot/52-54-00-ab-cd-ef.ipxe``."""
    return f"/boot/{hyphen_mac(mac)}.ipxe"


def image_path(image: str, name: str) -> str:
    return f"/images/{image}/{name}"


@dataclasses.dataclass(frozen=True)
class BootScript:
    """A rendered script. ``text`` may carry a token: it has no repr and is never logged."""

    profile: str  # "enlist", "provision", "retired" or "no-image"
    image: str | None
    text: str = dataclasses.field(repr=False)
    reason: str = ""


def unbootable_reason(image: Image | None) -> str:
    """Why ``image`` cannot be booted ("" when it can)."""
    if image is None:
        return "no current boot image on the seed yet"
    if KERNEL not in image.files or INITRD not in image.files:
        return f"image {image.name} has no {KERNEL} or {INITRD}"
    return ""


def _checked(args: Iterable[str]) -> list[str]:
    out = []
    for arg in args:
        if _UNSAFE_ARG.search(arg) or arg in ("||", "&&"):
            raise ScriptError(f"kernel argument {arg[:60]!r} cannot go into an iPXE script")
        out.append(arg)
    return out


class ScriptRenderer:
    """Renders the ``pxe/*.ipxe.j2`` templates; templates are read on first use."""

    def __init__(self, template_dir: Path = TEMPLATE_DIR) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(template_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # iPXE scripts, not HTML
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )

    def _render(self, name: str, **context: object) -> str:
        return self._env.get_template(f"{name}.ipxe.j2").render(**context)

    def chain(self, *, seed_url: str) -> str:
        """The fixed entry script: chain to the per-MAC script, iPXE filling in MAC and UUID."""
        return self._render("chain", seed_url=seed_url)

    def render(
        self,
        machine: Machine,
        image: Image | None,
        *,
        seed_url: str,
        config: BootConfig,
        token: Secret | None = None,
        retry_seconds: int = RETRY_SECONDS,
    ) -> BootScript:
        """The boot script for ``machine``.

        ``token``: the join token for ``PROVISION``. For ``ENLIST`` it is the
        hook for a short-lived discovery token (issue 4): when given, it goes
        on the command line as ``metalseed.token``; today callers pass None.
        """
        mac = machine.mac
        common = _common(machine, seed_url, retry_seconds)
        if machine.profile is BootProfile.RETIRED:
            return BootScript("retired", None, self._render("retired", **common))
        reason = unbootable_reason(image)
        if reason or image is None:
            return self.retry(
                machine, seed_url=seed_url, reason=reason, retry_seconds=retry_seconds
            )

        if machine.profile is BootProfile.PROVISION and (token is None or not machine.node_id):
            raise ScriptError("a provision script needs the node id and its token")

        def url(name: str) -> str:
            return f"{seed_url}{image_path(image.name, name)}?mac={hyphen_mac(mac)}"

        # what the operator wrote (manifest, config) is checked; the rest is built from
        # MACs, safe image names, node ids, hex digests and URL-safe tokens
        args = ["initrd=initrd", *_checked([*image.cmdline.split(), *config.kernel_args.split()])]
        args += [f"BOOTIF=01-{hyphen_mac(mac)}", *_checked([f"metalseed.url={seed_url}"])]
        if machine.profile is BootProfile.ENLIST:
            args.append("metalseed.mode=enlist")
        else:
            args.append(f"metalseed.node={machine.node_id}")
        if token is not None:
            args.append(f"metalseed.token={token.reveal()}")
        args.append(f"metalseed.mac={mac}")
        if ROOTFS in image.files:
            args += [
                f"metalseed.rootfs={url(ROOTFS)}",
                f"metalseed.rootfs_sha256={image.files[ROOTFS].sha256}",
            ]
        profile = str(machine.profile)
        text = self._render(
            profile,
            image=image.name,
            kernel_url=url(KERNEL),
            initrd_url=url(INITRD),
            cmdline=" ".join(args),
            **common,
        )
        return BootScript(profile, image.name, text)

    def retry(
        self, machine: Machine, *, seed_url: str, reason: str, retry_seconds: int = RETRY_SECONDS
    ) -> BootScript:
        """Print ``reason``, wait, fetch the script again. ``reason`` is shown by iPXE."""
        _checked(reason.split())
        common = _common(machine, seed_url, retry_seconds)
        return BootScript(
            "no-image", None, self._render("no-image", reason=reason, **common), reason
        )


def _common(machine: Machine, seed_url: str, retry_seconds: int) -> dict[str, object]:
    return {
        "mac": machine.mac,
        "node": machine.node_id or "",
        "seed_url": seed_url,
        "script_url": seed_url + script_path(machine.mac),
        "retry_seconds": int(retry_seconds),
    }
