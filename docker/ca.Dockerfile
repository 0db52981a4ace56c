# syntax=docker/dockerfile:1
# meshid-ca (the sidecar injector has its own image: docker/injector.Dockerfile).
# Build from the repository root:  docker build -f docker/ca.Dockerfile -t ghcr.io/meshid/ca:0.1.0 .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# No extra packages: aws-lc-sys builds its C core with the image's gcc through the cc crate
# (no cmake, clang or bindgen on x86_64/aarch64 Linux), as on a plain Debian bookworm machine.
# scripts/dist-build.sh: the `dist` profile with the sidecar's recorded profile (PGO,
# sidecar/pgo.profdata.gz; rustc reads it, no LLVM tools needed here).
# Packed relative relocations (scripts/symbol-order-build.rs): the run image's glibc (Debian
# 12's 2.36) loads them, and the loader no longer reads 0.3 MiB of relocations at every start.
ENV MESHID_PACKED_RELOCS=on
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/dist-build.sh -p meshid-ca --bin meshid-ca \
 && install -D -m 0755 target/dist/meshid-ca /out/meshid-ca

# distroless: glibc and CA certificates, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/meshid-ca /usr/local/bin/meshid-ca
USER 65532:65532
# gRPC (workload certificates) and admin (health, metrics).
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/meshid-ca"]
CMD ["--help"]
