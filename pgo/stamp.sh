# What a profile's function names depend on besides the source (pgo/release.sh): printed
# into pgo/tollgate.stamp when the profile is recorded, compared before it is used.
pgo_host() { rustc -vV | awk '/^host:/ {print $2}'; }
pgo_stamp() {
  rustc -vV | awk '/^release:/ {release = $2} /^commit-hash:/ {commit = $2}
    END {print "rustc " release " " commit}'
  echo "host $(pgo_host)"
  echo "Cargo.lock $(sha256sum Cargo.lock | cut -d' ' -f1)"
}
