# syntax=docker/dockerfile:1
# Portcullis container image: `docker build -t portcullis:0.1.0 .`
#
# Build stage: the release binary, with the exact dependency versions of Cargo.lock.
# protoc comes vendored (protoc-bin-vendored in build.rs) and aws-lc builds with the C
# compiler of the image, so nothing else is installed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY migrations ./migrations
COPY src ./src
COPY examples ./examples
# The cache mounts (BuildKit) keep the registry and compiled dependencies between builds;
# the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin portcullis \
    && install -D -m 0755 target/release/portcullis /out/portcullis \
    && mkdir -p /out/var-lib-portcullis

# Runtime: distroless glibc (the same Debian 12 as the build stage), no shell, no package
# manager. The database migrations are embedded in the binary (include_str! of
# migrations/{postgres,sqlite}/*.sql into sqlx's Migrator in src/store/*.rs), so
# `portcullis migrate` needs no files from the image; nothing else is copied.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/portcullis /usr/local/bin/portcullis
# Writable working directory for the zero-config default (./data: SQLite, generated key and
# pepper). The Helm chart sets data_dir to an emptyDir instead and mounts keys read-only.
COPY --from=build --chown=65532:65532 /out/var-lib-portcullis /var/lib/portcullis
WORKDIR /var/lib/portcullis
USER 65532:65532
# gRPC (server.listen) and ops HTTP (server.ops_listen: /healthz, /readyz, /metrics,
# /.well-known/jwks.json). Both default to 127.0.0.1 inside the container: set
# PORTCULLIS_SERVER__LISTEN=0.0.0.0:50051 and PORTCULLIS_SERVER__OPS_LISTEN=0.0.0.0:9090
# (the chart does). They are not set here, so a TOML file (--config) can still set them.
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["serve"]
