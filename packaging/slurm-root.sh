#!/bin/bash
# Responsible for: preparing /opt/slurm/RELEASE, a Debian root filesystem holding Debian's own binary Slurm
#   packages of that release (daemons, clients, headers, compiler), so the bed and the plugin build run on it.
# Not responsible for: starting anything in it (slinfer/dev/devcluster.py does), building the plugin (spank/Makefile).
# Idempotent: a root with its .complete stamp is left as it is.
set -euo pipefail
release=${1:?usage: slurm-root.sh 24.11|26.05 [ROOT]}
case "$release" in
  # trixie carries 24.11.x, sid carries 26.05.x (Debian's binary packages).
  24.11) suite=trixie ;;
  26.05) suite=sid ;;
  *) echo "slurm-root.sh: unsupported SLURM_RELEASE '$release' (24.11 or 26.05)" >&2; exit 2 ;;
esac
root=${2:-/opt/slurm/$release}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Daemons (slurmdbd too: one database per release, the bed's MariaDB is the host's), clients, headers and
# compiler; libffi8 for the venv's interpreter; ca-certificates because job steps
# inherit SSL_CERT_FILE=/etc/ssl/certs/... from the host.
packages="slurmd slurmctld slurmdbd slurm-client munge libslurm-dev gcc libc6-dev make libffi8 ca-certificates iproute2 procps util-linux"
if [ -f "$root/.complete" ] && [ "$(cat "$root/.packages" 2>/dev/null)" = "$packages" ]; then
  echo "slurm root $root is complete ($(cat "$root/.complete"))"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm-root.sh: run as root (debootstrap, chroot)" >&2; exit 1; }
start=$(date +%s)
if grep -q " $root/" /proc/self/mountinfo; then
  # The bed bind-mounts /tmp and the checkout into a root: never remove or rebuild one that has them.
  echo "slurm-root.sh: $root has mounts (a bed runs on it); run slinfer dev-cluster down first" >&2; exit 1
fi
if [ ! -x "$root/usr/bin/apt-get" ]; then
  rm -rf "$root"
  mkdir -p "$(dirname "$root")"
  debootstrap --variant=minbase "$suite" "$root" "$mirror"
fi
# The sid Release file served here has expired: apt must not check its validity date.
apt_opts=(-o Acquire::Check-Valid-Until=false -y -q --no-install-recommends)
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Check-Valid-Until=false -q update
# shellcheck disable=SC2086 # the package list is split on purpose
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install $packages
chroot "$root" apt-get clean
version=$(chroot "$root" slurmctld -V)
case "$version" in
  *" $release."*) ;;
  *) echo "slurm-root.sh: $root holds '$version', not $release" >&2; exit 1 ;;
esac
echo "$packages" >"$root/.packages"
echo "$version" >"$root/.complete"
echo "slurm root $root ready: $version in $(( $(date +%s) - start )) s"
