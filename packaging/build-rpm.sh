#!/bin/bash
# `make rpm [SLURM_RELEASE=24.11|26.05]`: builds the slinfer and slinfer-spank RPMs from the working tree into
# dist/, with rpmbuild (on Debian: apt-get install rpm), then runs rpmlint on them (packaging/rpm/slinfer.rpmlintrc
# names what it accepts, each with its reason; anything else it reports fails the build).
# The Release tag carries the Slurm release of the headers it compiles against (e.g. 1.slurm22.05): the build
# host's (/usr/include/slurm), or with a RELEASE argument that release's root (/opt/slurm/RELEASE, `make slurm`),
# inside which the plugin is compiled. On Debian rpmbuild runs with --nodeps: the BuildRequires name EL packages
# (slurm-devel, python3.11) whose Debian counterparts (libslurm-dev, python3.11) are checked here instead.
# usage: build-rpm.sh [RELEASE [ROOT]]
set -euo pipefail
cd "$(dirname "$0")/.."
release=${1:-}
root=${2:-${release:+/opt/slurm/$release}}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
spec_version=$(sed -n 's/^Version: *//p' packaging/rpm/slinfer.spec)
if [ "$spec_version" != "$version" ]; then
  echo "packaging/rpm/slinfer.spec is at $spec_version but pyproject.toml at $version" >&2
  exit 1
fi
command -v rpmbuild >/dev/null || { echo "make rpm needs rpmbuild: apt-get install rpm (or dnf install rpm-build)" >&2; exit 1; }
command -v rpmlint >/dev/null || { echo "make rpm needs rpmlint: apt-get install rpmlint (or dnf install rpmlint)" >&2; exit 1; }
defines=()
if [ -n "$root" ]; then
  [ -f "$root/.complete" ] || { echo "build-rpm.sh: $root is not ready: make slurm SLURM_RELEASE=$release" >&2; exit 1; }
  python=${PYTHON:-$PWD/.venv/bin/python}
  [ -x "$python" ] || { echo "build-rpm.sh: $python is missing (it mounts the root): make install" >&2; exit 1; }
  defines=(--define "slurm_root $(cd "$root" && pwd)" --define "slurm_python $python")
fi
header=$root/usr/include/slurm/slurm_version.h
[ -f "$header" ] || { echo "no Slurm headers ($header): install libslurm-dev / slurm-devel" >&2; exit 1; }
n=$(sed -n 's/^#define SLURM_VERSION_NUMBER //p' "$header")
slurm_version=$(printf '%d.%02d' $((n >> 16)) $(((n >> 8) & 255)))
if [ -n "$release" ] && [ "$release" != "$slurm_version" ]; then
  echo "build-rpm.sh: $root holds Slurm $slurm_version, not $release" >&2; exit 1
fi
nodeps=()
[ -f /etc/debian_version ] && nodeps=(--nodeps)

top=$PWD/build/rpm
rm -rf "$top" && mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS} dist
stage=$top/stage/slinfer-$version
mkdir -p "$stage"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents --no-dereference -t "$stage"
tar -C "$top/stage" -czf "$top/SOURCES/slinfer-$version.tar.gz" "slinfer-$version"
began=$(date +%s)
rpmbuild -bb "${nodeps[@]}" --define "_topdir $top" --define "slurm_version $slurm_version" "${defines[@]}" \
  packaging/rpm/slinfer.spec > "$top/build.log" 2>&1 || {
  tail -40 "$top/build.log" >&2; echo "rpmbuild failed: $top/build.log" >&2; exit 1; }
rpms=()
while IFS= read -r -d '' f; do
  mv -f "$f" dist/
  rpms+=("dist/$(basename "$f")")
done < <(find "$top/RPMS" -name '*.rpm' -print0)
echo "built in $(( $(date +%s) - began ))s for Slurm $slurm_version (log $top/build.log):"
ls -l "${rpms[@]}" | awk '{print "  " $NF, $5}'
# rpmlint exits non-zero on an error; a warning not accepted in the rpmlintrc fails too.
lint=$(rpmlint -r packaging/rpm/slinfer.rpmlintrc "${rpms[@]}" 2>&1) || {
  echo "$lint" >&2; echo "build-rpm.sh: rpmlint reports errors" >&2; exit 1; }
summary=$(echo "$lint" | grep 'packages and .* checked' || true)
if echo "$lint" | grep -q ': W: '; then
  echo "$lint" | grep ': W: ' >&2
  echo "build-rpm.sh: rpmlint warnings that packaging/rpm/slinfer.rpmlintrc does not accept" >&2; exit 1
fi
echo "  rpmlint:${summary#*;}"
