"""`metalseed serve`, `metalseed image ...`, `metalseed leases`: the boot side."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click

from .. import actions, ui
from ..image.catalogue import Catalogue
from . import Ctx, cli


@cli.command()
@click.option("--interface", "-i", default=None, help="The provisioning interface to serve on.")
@click.option(
    "--mode",
    type=click.Choice(["full", "proxy"]),
    default=None,
    help="full: hand out addresses from --pool; proxy: only PXE options, next to "
    "another DHCP server (default full).",
)
@click.option("--pool", default=None, help="Full mode: addresses to hand out, START-END.")
@click.option("--http-port", type=int, default=None, help="HTTP boot port (default 80).")
@click.option("--tftp-port", type=int, default=None, help="TFTP port (default 69).")
@click.option(
    "--force",
    is_flag=True,
    default=None,
    help="Full mode: start even if another DHCP server answers on the segment.",
)
@click.option(
    "--no-ra",
    "no_ra",
    is_flag=True,
    default=False,
    help="Do not answer IPv6 router solicitations.",
)
@click.pass_obj
def serve(obj: Ctx, **flags) -> int:
    """Serve DHCP, TFTP and HTTP boot on the provisioning interface until stopped."""
    from ..boot.serve import serve as run_serve

    config = obj.config(**serve_overrides(**flags))
    asyncio.run(run_serve(config, on_ready=announce_serving))
    return 0


def serve_overrides(
    *,
    interface: str | None = None,
    mode: str | None = None,
    pool: str | None = None,
    http_port: int | None = None,
    tftp_port: int | None = None,
    force: bool | None = None,
    no_ra: bool = False,
) -> dict[str, object]:
    """The config overrides of the boot-service flags (shared by `serve` and `run`)."""
    return {
        "boot.interface": interface,
        "boot.mode": mode,
        "boot.pool": pool,
        "boot.http_port": http_port,
        "boot.tftp_port": tftp_port,
        "boot.force": force or None,
        "boot.router_advertisements": False if no_ra else None,
    }


def announce_serving(info) -> None:
    click.echo(
        f"serving on {info.interface} ({info.address}, {info.mode} mode): "
        f"HTTP {info.seed_url}, TFTP port {info.tftp_port}; Ctrl-C to stop",
        err=True,
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def leases(obj: Ctx, as_json: bool) -> int:
    """DHCP leases and reservations (full mode)."""
    store = actions.open_store(obj.config())
    found = store.leases()
    reserved = store.reservations()
    if as_json:
        ui.print_json(
            [
                {**lease.to_json(), "reserved": reserved.get(lease.mac) == lease.ip}
                for lease in found
            ]
        )
        return 0
    now = time.time()
    rows = [
        (
            lease.ip,
            lease.mac,
            lease.state,
            lease.node_id or "",
            "yes" if reserved.get(lease.mac) == lease.ip else "",
            f"{int(lease.expires - now)}s" if lease.expires > now else "expired",
        )
        for lease in found
    ]
    ui.print_table(["ip", "mac", "state", "node", "reserved", "expires in"], rows)
    return 0


# -- images ---------------------------------------------------------------------------


@cli.group()
def image() -> None:
    """The boot images the seed serves."""


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def image_list(obj: Ctx, as_json: bool) -> int:
    """The images in the catalogue; * marks the current one."""
    catalogue = Catalogue(obj.config().images_dir)
    current = catalogue.current()
    images = catalogue.list()
    if as_json:
        ui.print_json(
            [{**i.to_json(), "current": bool(current and current.name == i.name)} for i in images]
        )
        return 0
    rows = [
        (
            i.name,
            "*" if current and current.name == i.name else "",
            ", ".join(f"{f.name} {f.size // 1024} KiB" for f in i.files.values()),
            ui.ago(i.created),
        )
        for i in images
    ]
    ui.print_table(["image", "current", "files", "created"], rows)
    return 0


@image.command("import")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--name", required=True, help="Image name (letters, digits, '.', '_', '-').")
@click.option("--cmdline", default="", help="Kernel command line the image needs.")
@click.option("--current", "make_current", is_flag=True, help="Make it the image new boots get.")
@click.pass_obj
def image_import(obj: Ctx, directory: Path, name: str, cmdline: str, make_current: bool) -> int:
    """Add vmlinuz, initrd (and rootfs.squashfs) from DIRECTORY as image NAME."""
    wanted = ("vmlinuz", "initrd", "rootfs.squashfs")
    files = {f: directory / f for f in wanted if (directory / f).is_file()}
    missing = [f for f in wanted[:2] if f not in files]
    if missing:
        raise click.UsageError(f"{directory} has no {', '.join(missing)}")
    img = Catalogue(obj.config().images_dir).add(
        name, files, cmdline=cmdline, make_current=make_current
    )
    click.echo(
        f"image {img.name}: " + ", ".join(f"{f.name} {f.sha256[:12]}" for f in img.files.values())
    )
    return 0


@image.command("build")
@click.option(
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also copy vmlinuz, initrd, rootfs.squashfs and manifest.json here.",
)
@click.option("--name", default="node", show_default=True, help="Catalogue name of the image.")
@click.option(
    "--current/--no-current",
    "make_current",
    default=True,
    help="Make it the image new boots get (default: yes).",
)
@click.option("--rebuild", is_flag=True, help="Build even if the cache has this recipe's image.")
@click.pass_obj
def image_build(obj: Ctx, output: Path | None, name: str, make_current: bool, rebuild: bool) -> int:
    """Build the node image from images/node/ (cached by the recipe's input hash).

    The cache is $METALSEED_IMAGE_CACHE (default /var/cache/metalseed/images);
    an unchanged recipe takes seconds. The image goes into the catalogue as NAME.
    """
    from ..image import build
    from ..image.catalogue import safe_name

    config = obj.config()
    safe_name(name)
    started = time.monotonic()
    with ui.progress("image build", total=1000) as bar:

        def progress(text: str, fraction: float) -> None:
            bar.update(int(fraction * 1000), text=f"image build: {text}")

        built = build.build_image(rebuild=rebuild, progress=progress)
    img = build.install_image(built, config.images_dir, name=name, make_current=make_current)
    if output is not None:
        build.export_image(built, output)
    sizes = ", ".join(f"{f.name} {f.size / 1e6:.1f} MB" for f in img.files.values())
    how = "cached" if built.cached else f"built in {time.monotonic() - started:.0f} s"
    click.echo(f"image {img.name} ({how}, input {built.key[:12]}): {sizes}")
    if output is not None:
        click.echo(f"files in {output}")
    return 0


@image.command("use")
@click.argument("name")
@click.pass_obj
def image_use(obj: Ctx, name: str) -> int:
    """Make NAME the image new boots get."""
    Catalogue(obj.config().images_dir).set_current(name)
    click.echo(f"current image: {name}")
    return 0
