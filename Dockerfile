# tollgate container image: `docker build -t tollgate .`, then
#   docker run --read-only --tmpfs /tmp -p 8080:8080 -v "$PWD/policy:/etc/tollgate:ro" tollgate
# with policy/gateway.yaml listening on 0.0.0.0:8080 (admin on 127.0.0.1:9901, or
# 0.0.0.0:9901 with a token where probes and Prometheus must reach it).

# Build stage: the profile-guided release build (pgo/release.sh, README "Profile-guided
# build") that .ci/run runs natively.
FROM rust:1.95-bookworm AS build
# Pingora builds zlib-ng with cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer: a code change rebuilds only tollgate.
COPY Cargo.toml Cargo.lock ./
COPY upstreams/Cargo.toml upstreams/
# The patched Pingora crate (Cargo.toml's [patch.crates-io], vendor/README.md).
COPY vendor vendor
# The build script and the profile the dependencies are optimised with too.
COPY pgo pgo
RUN mkdir -p src upstreams/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > upstreams/src/main.rs && touch upstreams/src/lib.rs \
 && bash pgo/release.sh \
 && rm -rf src upstreams/src
COPY src src
COPY upstreams/src upstreams/src
RUN touch src/main.rs src/lib.rs upstreams/src/lib.rs \
 && bash pgo/release.sh /out/full \
 && objcopy --only-keep-debug /out/full/tollgate /out/tollgate.debug \
 && objcopy --strip-debug --add-gnu-debuglink=/out/tollgate.debug /out/full/tollgate /out/tollgate \
 && rm -r /out/full

# The debug info every node need not pull (about 105 MB), for profilers and debuggers:
#   docker build --target symbols --output type=local,dest=symbols .
# The stripped binary keeps its symbol table, so backtraces and `perf` still name functions.
FROM scratch AS symbols
COPY --from=build /out/tollgate.debug /

# Runtime: glibc and libgcc only, no shell, uid 65532. The root filesystem may be
# read-only: the pid file and upgrade socket go to the temp dir (mount /tmp).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tollgate /usr/local/bin/tollgate
USER 65532:65532
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/tollgate", "probe", "http://127.0.0.1:9901/healthz"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["run", "-c", "/etc/tollgate/gateway.yaml"]
