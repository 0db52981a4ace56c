# syntax=docker/dockerfile:1
# meshid-sidecar. Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/meshid/sidecar:0.1.0 .
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
    scripts/dist-build.sh -p meshid-sidecar --bin meshid-sidecar \
 && install -D -m 0755 target/dist/meshid-sidecar /out/meshid-sidecar

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/meshid-sidecar /usr/local/bin/meshid-sidecar
USER 65532:65532
# 15021: admin (health, readiness, forwarded app probes); 15020: /metrics and /identity when
# started with --stats-listen 0.0.0.0:15020, as the injector does.
EXPOSE 15021 15020
ENTRYPOINT ["/usr/local/bin/meshid-sidecar"]
CMD ["run"]
