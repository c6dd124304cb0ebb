#!/usr/bin/env bash
# Install or upgrade modeld as a systemd service. Run as root; run it again to upgrade.
#
#   systemd/install.sh [--root DIR] [--python PYTHON] [--from SPEC]
#
# What goes where (under DIR, default /):
#   /opt/modeld/                       a venv holding modeld (upgraded in place)
#   /usr/local/bin/modeld              -> /opt/modeld/bin/modeld, for people and scripts
#   /etc/systemd/system/modeld.service the unit; ExecStart=/opt/modeld/bin/modeld serve ...
#   /etc/systemd/system/modeld-gateway.service  the optional HTTP gateway's unit (not enabled)
#   /usr/lib/sysusers.d/modeld.conf    the modeld user and group (systemd-sysusers)
#   /usr/lib/tmpfiles.d/modeld.conf    /var/lib/modeld and its models dir (systemd-tmpfiles)
#   /etc/modeld/modeld.toml            from modeld.toml.example, only when there is none
#   /usr/share/doc/modeld/README.md
# /var/lib/modeld (registry, models) and /etc/modeld/modeld.toml are created once and
# never overwritten, so an upgrade keeps them. SPEC is anything pip installs: the
# checkout this script is in (default), a wheel or sdist file, or e.g. "modeld==0.2.0".
# PYTHON (>= 3.11, default python3) makes the venv on the first install.
# With --root nothing is reloaded or restarted; the venv's scripts name DIR in their
# #! lines (venvs cannot move), so a tree staged that way is for checking, not copying.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=/
python=python3
spec="$here/.."
prefix=/opt/modeld

die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --from) spec=${2:?--from needs something pip installs}; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and writes /etc, /opt, /usr)"
for tool in systemd-sysusers systemd-tmpfiles; do
    command -v "$tool" >/dev/null || die "needs $tool (Debian package: systemd)"
done
root=$(realpath -m "$root")
r=${root%/}

# The user and group first: what follows is owned by them.
install -D -m 0644 "$here/modeld.sysusers" "$r/usr/lib/sysusers.d/modeld.conf"
install -D -m 0644 "$here/modeld.tmpfiles" "$r/usr/lib/tmpfiles.d/modeld.conf"
mkdir -p "$r/etc"
systemd-sysusers --root="$root" modeld.conf
systemd-tmpfiles --root="$root" --create modeld.conf

if [ ! -x "$r$prefix/bin/python" ]; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$python is older than Python 3.11"
    "$python" -m venv "$r$prefix"
fi
"$r$prefix/bin/python" -m pip install --quiet --upgrade "$spec"
# The same version number from a newer checkout is still new code.
"$r$prefix/bin/python" -m pip install --quiet --no-deps --force-reinstall "$spec"
install -d "$r/usr/local/bin"
ln -sfn "$prefix/bin/modeld" "$r/usr/local/bin/modeld"

install -D -m 0644 "$here/modeld.service" "$r/etc/systemd/system/modeld.service"
install -D -m 0644 "$here/modeld-gateway.service" "$r/etc/systemd/system/modeld-gateway.service"
if [ ! -e "$r/etc/modeld/modeld.toml" ]; then
    gid=$(awk -F: '$1 == "modeld" { print $3 }' "$r/etc/group")
    install -d -m 0755 "$r/etc/modeld"
    install -m 0640 -o 0 -g "$gid" "$here/modeld.toml.example" "$r/etc/modeld/modeld.toml"
    fresh=1
fi
if [ -f "$here/../README.md" ]; then
    install -D -m 0644 "$here/../README.md" "$r/usr/share/doc/modeld/README.md"
fi

version=$("$r$prefix/bin/modeld" --version)
if [ "$root" = / ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl try-restart modeld.service modeld-gateway.service
fi
echo "installed $version in $r$prefix"
if [ -n "${fresh:-}" ]; then
    echo "next: edit $r/etc/modeld/modeld.toml, then: systemctl enable --now modeld"
fi
