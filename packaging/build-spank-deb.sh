#!/bin/bash
# `make deb-spank SLURM_RELEASE=24.11|26.05`: the slinfer-spank .deb for another Slurm release, into dist/.
# Responsible for: building the plugin inside that release's root (/opt/slurm/RELEASE, `make slurm`), against
#   its headers, and packaging it as debian/rules does for the system's Slurm: the plugin in Slurm's plugin dir,
#   the plugstack.conf.d snippet as a conffile, and the dependency pinned to that release
#   (slurm-wlm-basic-plugins >= R, << R+1). The version carries the release: 0.1.0-1+slurm24.11.
# Not responsible for: the slinfer package itself (make deb builds it for Debian 12).
set -euo pipefail
cd "$(dirname "$0")/.."
release=${1:?usage: build-spank-deb.sh 24.11|26.05 [ROOT]}
root=${2:-/opt/slurm/$release}
[ -f "$root/.complete" ] || { echo "build-spank-deb.sh: $root is not ready: make slurm SLURM_RELEASE=$release" >&2; exit 1; }
python=${PYTHON:-$PWD/.venv/bin/python}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
deb_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
began=$(date +%s)
make -s -C spank SLURM_ROOT="$root" PYTHON="$python" check >/dev/null
slurm_deb=$(chroot "$root" dpkg-query -W -f='${Version}' libslurm-dev)
n=$(sed -n 's/^#define SLURM_VERSION_NUMBER //p' "$root/usr/include/slurm/slurm_version.h")
built=$(printf '%d.%02d' $((n >> 16)) $(((n >> 8) & 255)))
next=$(printf '%d.%02d' $((n >> 16)) $((((n >> 8) & 255) + 1)))
[ "$built" = "$release" ] || { echo "build-spank-deb.sh: $root holds Slurm $built, not $release" >&2; exit 1; }
multiarch=$(chroot "$root" dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
plugin_dir=/usr/lib/$multiarch/slurm-wlm
stage=build/spank-deb-$release
rm -rf "$stage" && mkdir -p "$stage/DEBIAN" dist
install -D -m 0644 "spank/build/$release/spank_slinfer.so" "$stage$plugin_dir/spank_slinfer.so"
sed -e "s|@PLUGIN_DIR@|$plugin_dir|" -e "s|@SLURM_VERSION@|$slurm_deb|" packaging/spank/slinfer.conf.in |
  install -D -m 0644 /dev/stdin "$stage/etc/slurm/plugstack.conf.d/slinfer.conf"
install -D -m 0644 packaging/debian/copyright "$stage/usr/share/doc/slinfer-spank/copyright"
gzip -9n <packaging/debian/changelog >"$stage/usr/share/doc/slinfer-spank/changelog.Debian.gz"
chmod 0644 "$stage/usr/share/doc/slinfer-spank/changelog.Debian.gz"
strip --strip-unneeded "$stage$plugin_dir/spank_slinfer.so"
echo /etc/slurm/plugstack.conf.d/slinfer.conf >"$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: slinfer-spank
Version: $deb_version+slurm$release
Architecture: amd64
Maintainer: $(sed -n 's/^Maintainer: //p' packaging/debian/control)
Installed-Size: $size
Depends: slinfer (>= $version), slurm-wlm-basic-plugins (>= $release), slurm-wlm-basic-plugins (<< $next), libc6
Section: net
Priority: optional
Homepage: $(sed -n 's/^Homepage: //p' packaging/debian/control)
Description: Slurm SPANK plugin for slinfer (--inference), for Slurm $release
 Adds --inference=MODEL and --inference-pool to sbatch, salloc and srun,
 runs slinfer's hook in the job prolog and epilog, and gives every job step
 the engine's address and key (OPENAI_BASE_URL, OPENAI_API_KEY,
 SLINFER_MODEL).
 .
 A SPANK plugin must match the Slurm release it was built for: this build is
 for Slurm $release (libslurm-dev $slurm_deb).
CONTROL
out=dist/slinfer-spank_${deb_version}+slurm${release}_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "built $out in $(( $(date +%s) - began ))s"
