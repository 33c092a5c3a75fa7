# syntax=docker/dockerfile:1.7
# Builds `colony-operator` from this repository. From the repository root:
#   docker build -f docker/operator.Dockerfile -t colony-operator:dev .
# (docker/operator.Dockerfile.dockerignore keeps target/ and other bulk out of the context.)

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p colony-operator --bin colony-operator \
    && install -D -m 0755 target/release/colony-operator /out/colony-operator

# Distroless: no shell, no package manager; runs as the unprivileged "nonroot" user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/colony-operator /usr/local/bin/colony-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/colony-operator"]
CMD ["run"]
