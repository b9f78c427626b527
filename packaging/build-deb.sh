#!/bin/bash
# `make deb`: builds the slinfer and slinfer-spank .debs from the working tree into dist/.
# The tree (tracked and untracked files git does not ignore) is copied to build/deb/slinfer-VERSION with
# packaging/debian as debian/, so that the build never writes into the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
deb_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "${deb_version%-*}" != "$version" ]; then
  echo "packaging/debian/changelog is at $deb_version but pyproject.toml at $version: add a changelog entry" >&2
  exit 1
fi
missing=$(for p in debhelper libslurm-dev python3.11-venv dpkg-dev; do dpkg -s $p >/dev/null 2>&1 || echo $p; done)
if [ -n "$missing" ]; then
  echo "make deb needs: apt-get install $missing" >&2
  exit 1
fi
src=build/deb/slinfer-$version
rm -rf build/deb && mkdir -p "$src" dist
git ls-files -z --cached --others --exclude-standard | grep -zv '^packaging/debian/' |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents --no-dereference -t "$src"
cp -r packaging/debian "$src/debian"
# Compiled objects of a checkout build must not leak in: the package builds the plugin itself.
make -s -C "$src/spank" clean
began=$(date +%s)
(cd "$src" && dpkg-buildpackage -us -uc -b) > build/deb/build.log 2>&1 || {
  tail -40 build/deb/build.log >&2; echo "dpkg-buildpackage failed: build/deb/build.log" >&2; exit 1; }
for f in build/deb/*.deb build/deb/*.buildinfo build/deb/*.changes; do
  mv -f "$f" dist/
done
echo "built in $(( $(date +%s) - began ))s (log build/deb/build.log):"
ls -l dist/*_"$deb_version"_*.deb | awk '{print "  " $NF, $5}'
