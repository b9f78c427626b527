#!/bin/bash
# `make rpm`: builds the slinfer and slinfer-spank RPMs from the working tree into dist/, with rpmbuild
# (on Debian: apt-get install rpm). The Release tag carries the Slurm release of the headers it compiles
# against (e.g. 1.slurm22.05). On Debian rpmbuild runs with --nodeps: the BuildRequires name EL packages
# (slurm-devel, python3.11) whose Debian counterparts (libslurm-dev, python3.11) are checked here instead.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
spec_version=$(sed -n 's/^Version: *//p' packaging/rpm/slinfer.spec)
if [ "$spec_version" != "$version" ]; then
  echo "packaging/rpm/slinfer.spec is at $spec_version but pyproject.toml at $version" >&2
  exit 1
fi
command -v rpmbuild >/dev/null || { echo "make rpm needs rpmbuild: apt-get install rpm (or dnf install rpm-build)" >&2; exit 1; }
header=/usr/include/slurm/slurm_version.h
[ -f $header ] || { echo "no Slurm headers ($header): install libslurm-dev / slurm-devel" >&2; exit 1; }
n=$(sed -n 's/^#define SLURM_VERSION_NUMBER //p' $header)
slurm_version=$(printf '%d.%02d' $((n >> 16)) $(((n >> 8) & 255)))
nodeps=()
[ -f /etc/debian_version ] && nodeps=(--nodeps)

top=$PWD/build/rpm
rm -rf "$top" && mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS} dist
stage=$top/stage/slinfer-$version
mkdir -p "$stage"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents -t "$stage"
tar -C "$top/stage" -czf "$top/SOURCES/slinfer-$version.tar.gz" "slinfer-$version"
began=$(date +%s)
rpmbuild -bb "${nodeps[@]}" --define "_topdir $top" --define "slurm_version $slurm_version" \
  packaging/rpm/slinfer.spec > "$top/build.log" 2>&1 || {
  tail -40 "$top/build.log" >&2; echo "rpmbuild failed: $top/build.log" >&2; exit 1; }
find "$top/RPMS" -name '*.rpm' -exec mv -f {} dist/ \;
echo "built in $(( $(date +%s) - began ))s for Slurm $slurm_version (log $top/build.log):"
ls -l dist/*"-$version-1.slurm$slurm_version"*.rpm | awk '{print "  " $NF, $5}'
