# syntax=docker/dockerfile:1.7
# Builds `colony-node` from this repository. From the repository root:
#   docker build -f docker/node.Dockerfile -t colony-node:dev .
# (docker/node.Dockerfile.dockerignore keeps target/ and other bulk out of the context.)

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p colony-node --bin colony-node \
    && install -D -m 0755 target/release/colony-node /out/colony-node

# Distroless: no shell, no package manager; runs as the unprivileged "nonroot" user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/colony-node /usr/local/bin/colony-node
USER 65532:65532
# Node pods mount their data volume here (the StatefulSet sets COLONY_DATA_DIR).
VOLUME ["/var/lib/colony"]
EXPOSE 8787
ENTRYPOINT ["/usr/local/bin/colony-node"]
CMD ["serve", "--config", "/etc/colony/node.yaml"]
