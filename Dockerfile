# syntax=docker/dockerfile:1
#
# cellgate edge node image: a Rust build stage, then a small Debian runtime
# with only the binary and CA certificates, running as a non-root user.
#
#   docker build -t cellgate .
#   docker run -d --name cellgate \
#     -v /etc/cellgate:/etc/cellgate:ro -v cellgate-state:/var/lib/cellgate \
#     -p 53:53/udp -p 53:53 -p 80:80 -p 443:443 -p 127.0.0.1:9901:9901 \
#     cellgate
#
# Ports below 1024 without root: the binary carries the file capability
# cap_net_bind_service (set below), which the container's default
# capability set allows; with `--cap-drop ALL` add `--cap-add
# NET_BIND_SERVICE`, and do not combine it with `--security-opt
# no-new-privileges` (that drops file capabilities; Docker's default
# unprivileged-port sysctl then still covers bridge networking, not
# `--network host`). dist/README.md has the whole procedure, upgrades
# included.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# pingora builds zlib-ng with cmake. No dependency runs protoc (see
# Cargo.lock: no prost-build), so protobuf-compiler is not installed.
# Debian package versions are not pinned (DL3008): the archive drops old
# versions with every security update, which would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cellgate \
 && install -D -m 0755 target/release/cellgate /out/cellgate

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: TLS to cells. libcap2-bin only to set the capability,
# then removed. Versions unpinned, as above.
COPY --from=build /out/cellgate /usr/local/bin/cellgate
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcap2-bin \
 && setcap cap_net_bind_service=+ep /usr/local/bin/cellgate \
 && apt-get purge -y --auto-remove libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cellgate \
 && useradd --system --uid 10001 --gid cellgate --home-dir /var/lib/cellgate \
      --no-create-home --shell /usr/sbin/nologin cellgate \
 && install -d -o cellgate -g cellgate -m 0700 /var/lib/cellgate /run/cellgate \
 && install -d -m 0755 /etc/cellgate
# Mount the config at /etc/cellgate/cellgate.toml; point admin.state_file
# at /var/lib/cellgate (a volume) so drains, weights and pins survive.
ENV CELLGATE_UPGRADE_SOCKET=/run/cellgate/upgrade.sock
USER 10001:10001
WORKDIR /var/lib/cellgate
EXPOSE 53/udp 53/tcp 80/tcp 443/tcp 9901/tcp
# SIGTERM (docker stop): stop accepting, finish in-flight requests within
# proxy.grace_period; give `docker stop --time` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cellgate"]
CMD ["run", "--config", "/etc/cellgate/cellgate.toml"]
