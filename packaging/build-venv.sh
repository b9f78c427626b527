#!/bin/bash
# Builds slinfer's private virtual environment for a package: created with the distribution's Python under
# DESTDIR+PREFIX, then relocated so that every path inside it names PREFIX (where the package installs it).
# Shared by packaging/debian/rules and packaging/rpm/slinfer.spec, so both packages ship the same tree.
#
# usage: build-venv.sh PYTHON SRC DESTDIR PREFIX
#   PYTHON   the distribution's interpreter, e.g. /usr/bin/python3.11 (the venv links to it)
#   SRC      the source tree (pyproject.toml)
#   DESTDIR  the package's staging root (debian/slinfer, %{buildroot})
#   PREFIX   where the venv lives once installed, e.g. /opt/slinfer
# Wheels come from PyPI, and from /opt/wheels or $SLINFER_WHEELS when that folder exists (offline sites).
set -euo pipefail

python=$1 src=$2 destdir=$3 prefix=$4
stage="$destdir$prefix"
extras="gpu,kubernetes,fast,mysql"

rm -rf "$stage"
"$python" -m venv "$stage"
find_links=()
for dir in "${SLINFER_WHEELS:-}" /opt/wheels; do
  [ -n "$dir" ] && [ -d "$dir" ] && find_links+=(--find-links "$dir")
done
# No byte-compiling here: .pyc files would record the staging path; postinst compiles them in place.
"$stage/bin/python" -m pip install -q --disable-pip-version-check --no-compile --prefer-binary \
  "${find_links[@]}" "$src[$extras]"
# The package is a closed application: nothing installs into it after the build.
"$stage/bin/python" -m pip uninstall -q -y pip setuptools
rm -f "$stage"/bin/activate* "$stage"/bin/Activate.ps1 "$stage"/bin/pip*
find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
# Some wheels mark their modules executable; only bin/ and shared objects need the bit.
find "$stage"/lib -type f -perm /111 ! -name '*.so' ! -name '*.so.*' -exec chmod a-x {} +

# Relocate: console-script shebangs, pyvenv.cfg and pip's records name the staging folder.
grep -rlI --null -F "$stage" "$stage" | xargs -0 -r sed -i "s|$stage|$prefix|g"
if grep -rl -F "$stage" "$stage" >/dev/null; then
  echo "build-venv.sh: files still name the staging path $stage:" >&2
  grep -rl -F "$stage" "$stage" >&2
  exit 1
fi
# The source tree's path is no business of the installed package.
find "$stage" -name direct_url.json -path '*slinfer-*' -delete
echo "build-venv.sh: $prefix from $("$python" --version) with slinfer[$extras]:" \
  "$(du -sh "$stage" | cut -f1), $(ls "$stage"/lib/python3*/site-packages | grep -c dist-info) distributions"
