# syntax=docker/dockerfile:1
# The `shoal` binary in a small image: every role (control, replica,
# gateway) runs from it, e.g. `docker run IMAGE replica --help`.
#
#   docker build -t shoal:0.1.0 .
#
# Models are not in the image: replicas fetch what the control plane deploys.
# (`shoal up`'s demo model is compiled into the binary.)

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The workspace: every member's manifest must be present for --locked, and
# the files the code embeds with include_bytes!/include_str! (models/ and
# assets/ at the root, each crate's own assets/ and migrations/).
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY models ./models
COPY assets ./assets
# Cache mounts keep the registry and compiled dependencies between builds;
# the binary is copied out of the cached target directory. Without the
# default `bench` feature: the image serves, it does not benchmark.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p shoal --no-default-features \
    && install -m 0755 target/release/shoal /usr/local/bin/shoal

FROM ${RUNTIME_IMAGE}
# CA certificates for https:// (S3, a TLS control plane) with the system's
# roots; nothing else: the binary links only glibc (same Debian release as
# the build stage). ca-certificates is left unpinned on purpose: a rebuild
# picks up the release's current roots.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shoal \
    && useradd --system --uid 10001 --gid shoal --home-dir /var/lib/shoal \
        --no-create-home --shell /usr/sbin/nologin shoal \
    && install -d -o shoal -g shoal -m 0750 /var/lib/shoal
COPY --from=build /usr/local/bin/shoal /usr/local/bin/shoal
USER 10001:10001
WORKDIR /var/lib/shoal
# gateway, control plane, replica
EXPOSE 8080 8081 8090
ENTRYPOINT ["/usr/local/bin/shoal"]
CMD ["--help"]
