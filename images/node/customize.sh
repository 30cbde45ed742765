#!/bin/sh
# metalseed node image: the last step inside the image root (chroot), after the
# packages, the files of rootfs/ and the node agent are in place.
#
# bootstrap/image/build.py runs it with:
#   METALSEED_PURGE            packages to purge despite dependencies (recipe "purge")
#   METALSEED_SETUID_ALLOWED   files that keep a setuid/setgid bit (recipe "setuid_allowed")
# Why each step: images/README.md.
set -eu
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

step() { echo "customize: $*"; }

step "purging ${METALSEED_PURGE:-nothing}"
if [ -n "${METALSEED_PURGE:-}" ]; then
	# shellcheck disable=SC2086 # a word list on purpose
	dpkg --purge --force-depends $METALSEED_PURGE
fi

step "accounts: root locked, login defaults"
passwd -l root >/dev/null
sed -i \
	-e 's/^UMASK\s.*/UMASK\t\t027/' \
	-e 's/^PASS_MAX_DAYS\s.*/PASS_MAX_DAYS\t365/' \
	-e 's/^PASS_MIN_DAYS\s.*/PASS_MIN_DAYS\t1/' \
	/etc/login.defs
grep -q '^SHA_CRYPT_MIN_ROUNDS' /etc/login.defs ||
	printf 'SHA_CRYPT_MIN_ROUNDS\t5000\nSHA_CRYPT_MAX_ROUNDS\t50000\n' >>/etc/login.defs
# idle interactive shells end after 15 minutes (lynis reads it from /etc/profile itself)
grep -q '^TMOUT=' /etc/profile || printf '\n# metalseed: idle shells end\nTMOUT=900\nreadonly TMOUT\nexport TMOUT\n' >>/etc/profile

step "services"
cp /usr/share/systemd/tmp.mount /etc/systemd/system/tmp.mount
systemctl enable --quiet \
	nftables.service systemd-networkd.service ssh.service chrony.service lldpd.service \
	metalseed-ssh-hostkeys.service metalseed-agent.service metalseed-dhcp-hostname.path \
	tmp.mount
# timers and pollers a stateless node has no use for (no apt, no persistent disks of
# its own to trim or scrub; Ceph watches its disks)
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
	e2scrub_all.timer e2scrub_reap.service fstrim.timer smartmontools.service \
	nvmf-autoconnect.service nvmefc-boot-connections.service systemd-timesyncd.service \
	usbguard-dbus.service; do
	systemctl mask --quiet "$unit"
done
systemctl set-default --quiet multi-user.target

step "usbguard: the recipe's policy only, root-only control"
# (its postinst wrote a policy from the build host's USB devices and let plugdev in)
rm -rf /etc/usbguard/IPCAccessControl.d/*
sed -i 's/^IPCAllowedGroups=.*/IPCAllowedGroups=root/' /etc/usbguard/usbguard-daemon.conf
chmod 0600 /etc/usbguard/rules.conf /etc/usbguard/usbguard-daemon.conf

step "ssh: no host keys in the image"
rm -f /etc/ssh/ssh_host_*

step "setuid/setgid bits"
find / -xdev -type f \( -perm -4000 -o -perm -2000 \) | while read -r f; do
	case " ${METALSEED_SETUID_ALLOWED:-} " in
	*" $f "*) ;;
	*) chmod ug-s "$f" && echo "  stripped $f" ;;
	esac
done

step "identity: machine-id, hostname and resolver made at boot"
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/hostname /etc/resolv.conf /etc/mailname

step "trimming"
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/groff/* \
	/usr/share/lintian/* /usr/share/linda/* /usr/share/bug/* /usr/share/locale/* \
	/usr/share/i18n/* /usr/share/bash-completion/* /usr/share/zsh/* /usr/share/fish/* \
	/usr/share/gtk-doc/* /usr/share/help/*
rm -rf /boot/* /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old \
	/var/lib/dpkg/*-old /var/cache/ldconfig/aux-cache /tmp/* /var/tmp/* /root/.cache
rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* /etc/apt/apt.conf.d/90metalseed-build \
	/usr/sbin/policy-rc.d /etc/ssh/sshd_config.ucf-* /etc/*- /etc/.pwd.lock
find /var/log -type f -delete
step "done"
