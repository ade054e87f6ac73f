# syntax=docker/dockerfile:1
#
# kissbot-exporter container image.
#
#   docker build -t kissbot-exporter .
#   docker run -d -p 127.0.0.1:8377:8377 -v kissbot-socket:/run/kissbot \
#     -v kissbot-data:/var/lib/kissbot kissbot-exporter
#
# The builder and the runtime are both Debian 12 (bookworm), so the binary
# links against the same glibc it runs with.

ARG RUST_VERSION=1.90.0
ARG DEBIAN_VERSION=12.11

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# All of the context, not only src/: the root Cargo.toml is a workspace, and
# Cargo reads every member (crates/kissbot-client, tools/loadgen) to build
# any one binary.
COPY . .
# The registry and target caches speed up rebuilds (BuildKit); --locked
# builds exactly the dependency versions of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kissbot-exporter \
    && install -D -m 0755 target/release/kissbot-exporter /out/kissbot-exporter

FROM debian:${DEBIAN_VERSION}-slim
# An unprivileged user owns the socket and database directories. Named
# volumes mounted there start with this ownership.
RUN groupadd --system --gid 10001 kissbot \
    && useradd --system --uid 10001 --gid kissbot --home-dir /var/lib/kissbot --shell /usr/sbin/nologin kissbot \
    && install -d -o kissbot -g kissbot -m 0750 /var/lib/kissbot \
    && install -d -o kissbot -g kissbot -m 0770 /run/kissbot
COPY --from=builder /out/kissbot-exporter /usr/local/bin/kissbot-exporter
USER kissbot:kissbot
WORKDIR /var/lib/kissbot
VOLUME ["/run/kissbot", "/var/lib/kissbot"]
EXPOSE 8377
ENTRYPOINT ["/usr/local/bin/kissbot-exporter"]
# Flags are the command so that `docker run IMAGE --flag=...` or Compose's
# `command:` can replace them; every flag also has a KISSBOT_EXPORTER_*
# environment variable.
CMD ["--web.listen-address=0.0.0.0:8377", \
     "--socket.path=/run/kissbot/kissbot_monitor.sock", \
     "--db.path=/var/lib/kissbot/kissbot_monitor.db"]
