# What a profile's function names depend on besides the source (pgo/release.sh): printed
# into pgo/tollgate.stamp when the profile is recorded, compared before it is used.
pgo_stamp() {
  echo "rustc $(rustc -vV | awk '/^release:/ {print $2}') $(rustc -vV | awk '/^commit-hash:/ {print $2}')"
  echo "host $(rustc -vV | awk '/^host:/ {print $2}')"
  echo "Cargo.lock $(sha256sum Cargo.lock | cut -d' ' -f1)"
}
