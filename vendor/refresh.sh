#!/usr/bin/env bash
# Rebuilds each vendored crate from its published .crate (checked against the checksum
# crates.io publishes in the index, recorded below) and the patch series in
# vendor/patches/<crate>/, in order. vendor/README.md says when to run it.
#
#   bash vendor/refresh.sh          # rewrite vendor/<crate>/ from crate + patches
#   bash vendor/refresh.sh --check  # only verify vendor/<crate>/ is exactly that
set -euo pipefail
cd "$(dirname "$0")"

# crate version sha256 (of the .crate file, as in Cargo.lock before the patch)
CRATES=(
  "pingora-core 0.9.1 a535f47f65fdcb003f9e1df04cd18e614c128dfe9388acce3f211ae38ac14d68"
  "pingora-http 0.9.1 3f38e9e519d53fab09eb320f7be2cd27ef9e66f755eba3bd84cc68852108d841"
  "pingora-runtime 0.9.1 09d2c5be0a8fcffa36c23d21b3d6ec5bad113395086f5b4e1a0c50b300c674c0"
  "pingora-proxy 0.9.1 8e3d5670490740405ecc8c6f75c3fcbce4d24f7adaffb355ca44550e7918e358"
  "mimalloc 0.1.52 2d4139bb28d14ad1facf21d5eb8825051b326e172d216b39f6d31df53cc97862"
)

status=0
for entry in "${CRATES[@]}"; do
  read -r crate version sha <<<"$entry"
  work=$(mktemp -d)
  file="$work/$crate-$version.crate"
  cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$version.crate" 2>/dev/null | head -n1 || true)
  if [ -n "$cached" ]; then
    cp "$cached" "$file"
  else
    curl -fsSL "https://static.crates.io/crates/$crate/$crate-$version.crate" -o "$file"
  fi
  echo "$sha  $file" | sha256sum -c --quiet
  tar xzf "$file" -C "$work"
  for patch in patches/"$crate"/*.patch; do
    [ -e "$patch" ] || continue
    patch --quiet --directory "$work/$crate-$version" --strip 1 --input "$PWD/$patch"
  done
  if [ "${1:-}" = --check ]; then
    if diff -r "$work/$crate-$version" "$crate" >/dev/null; then
      echo "$crate $version: vendor/$crate is the published crate plus its patches"
    else
      diff -r "$work/$crate-$version" "$crate" | head -n 40
      echo "$crate $version: vendor/$crate differs from the published crate plus its patches" >&2
      status=1
    fi
  else
    rm -rf "$crate"
    mv "$work/$crate-$version" "$crate"
    echo "$crate $version: rebuilt from the published crate and $(ls patches/"$crate"/*.patch 2>/dev/null | wc -l) patches"
  fi
  rm -rf "$work"
done
exit $status
