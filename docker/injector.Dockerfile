# syntax=docker/dockerfile:1
# meshid-injector, the sidecar injector (mutating admission webhook). Build from the repository root:
#   docker build -f docker/injector.Dockerfile -t ghcr.io/meshid/injector:0.1.0 .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# No extra packages: aws-lc-sys builds its C core with the image's gcc through the cc crate
# (no cmake, clang or bindgen on x86_64/aarch64 Linux), as on a plain Debian bookworm machine.
# scripts/dist-build.sh: the `dist` profile with the sidecar's recorded profile (PGO,
# sidecar/pgo.profdata.gz; rustc reads it, no LLVM tools needed here).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/dist-build.sh -p meshid-injector --bin meshid-injector \
 && install -D -m 0755 target/dist/meshid-injector /out/meshid-injector

# distroless: glibc and CA certificates, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/meshid-injector /usr/local/bin/meshid-injector
USER 65532:65532
# Webhook (HTTPS) and admin (health, metrics); the chart's injector.port and injector.adminPort.
EXPOSE 9443 9444
ENTRYPOINT ["/usr/local/bin/meshid-injector"]
CMD ["--help"]
