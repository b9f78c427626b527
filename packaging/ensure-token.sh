#!/bin/sh
# /usr/libexec/slinfer/ensure-token [CONFIG]: run by the packages' postinst / %post.
# Writes a random [controller].token into the config when none is set, and only then: an upgrade, or a site
# that set its own token, keeps the one it has (the config is a conffile / %config(noreplace), so the package
# manager keeps the edited file too). An empty `token = ""` line is filled in; otherwise the line goes right
# under [controller] (or a [controller] table is appended). Exits 0 when a token is set afterwards.
set -eu
CONFIG=${1:-/etc/slinfer/slinfer.toml}

# A token counts when [controller] holds an uncommented `token = "<at least one character>"`.
token_set() {
    awk '
        /^[[:space:]]*\[/ { section = $0; sub(/[[:space:]]*#.*/, "", section); gsub(/[[:space:]]/, "", section) }
        section == "[controller]" && /^[[:space:]]*token[[:space:]]*=[[:space:]]*"[^"]+"/ { found = 1 }
        END { exit !found }' "$CONFIG"
}

[ -f "$CONFIG" ] || { echo "ensure-token: $CONFIG does not exist" >&2; exit 1; }
if token_set; then
    exit 0
fi
# 32 random bytes as hex: no character needs escaping in TOML or in a shell.
token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
[ ${#token} -eq 64 ] || { echo "ensure-token: could not read /dev/urandom" >&2; exit 1; }
line="token = \"$token\"  # generated at install; the same on every node (docs/admin/security.md: rotating the token)"
if grep -Eq '^[[:space:]]*token[[:space:]]*=[[:space:]]*""' "$CONFIG"; then
    sed -i -E "s|^[[:space:]]*token[[:space:]]*=[[:space:]]*\"\".*$|$line|" "$CONFIG"
elif grep -Eq '^[[:space:]]*\[controller\][[:space:]]*(#.*)?$' "$CONFIG"; then
    sed -i -E "0,/^[[:space:]]*\[controller\][[:space:]]*(#.*)?$/s||&\n$line|" "$CONFIG"
else
    printf '\n[controller]\n%s\n' "$line" >> "$CONFIG"
fi
token_set || { echo "ensure-token: could not write a token into $CONFIG" >&2; exit 1; }
echo "slinfer: generated [controller].token in $CONFIG; copy it to every node's config"
