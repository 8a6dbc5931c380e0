#!/usr/bin/env bash
# The release build of tollgate, optimised with the committed profile (README,
# "Profile-guided build"): what the Dockerfile and .ci/delivery build and what the
# benchmarks measure.
#
#   bash pgo/release.sh [DEST]    # with DEST, the binary is copied to DEST/tollgate
#
# --target is the build machine's own triple: it keeps the profile off build scripts and
# proc macros, and builds the crates under the names pgo/profile.sh recorded them by.
# Those names carry hashes of the compiler, the target and every dependency's version:
# a profile recorded with another toolchain or Cargo.lock matches nothing and would leave
# the build silently unoptimised, so that is refused (pgo/tollgate.stamp says what the
# profile was recorded with). On another target the build goes without the profile.
set -euo pipefail
cd "$(dirname "$0")/.."
source pgo/stamp.sh
host=$(pgo_host)
recorded_on=$(awk '/^host / {print $2}' pgo/tollgate.stamp)
flags=${RUSTFLAGS:-}
if [ "$recorded_on" != "$host" ]; then
  echo "pgo: the profile was recorded on $recorded_on; building for $host without it" >&2
elif ! diff <(pgo_stamp) pgo/tollgate.stamp >&2; then
  echo "pgo: pgo/tollgate.profdata was recorded with another toolchain or Cargo.lock (above: < this build, > the profile's);" \
    "refresh it with 'bash pgo/profile.sh' and commit both files" >&2
  exit 1
else
  flags="$flags -Cprofile-use=$PWD/pgo/tollgate.profdata"
fi
RUSTFLAGS=$flags cargo build --release --locked --bin tollgate --target "$host"
if [ $# -gt 0 ]; then
  mkdir -p "$1"
  cp "target/$host/release/tollgate" "$1/tollgate"
fi
