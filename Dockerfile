# archmerge in a container: a multi-stage build, non-root runtime.
#
#   docker build -t archmerge .
#   docker run --rm -p 5080:5080 -e ARCHMERGE_UPSTREAM=http://my-registry:5000 archmerge
#   docker run --rm -p 5080:5080 -p 127.0.0.1:5081:5081 -e ARCHMERGE_UPSTREAM=… \
#     -e ARCHMERGE_ADMIN_LISTEN=0.0.0.0:5081 -e ARCHMERGE_ADMIN_TOKEN=… archmerge
#
# docker-compose.yml runs it together with registry:2. The runtime image is
# Debian slim, ca-certificates and the stripped binary (the release profile
# strips it); scripts/test.sh builds it and runs the compose stack
# (tests/deploy.rs).

# === build ===
FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, against stub sources: this layer is reused until
# Cargo.toml or Cargo.lock change.
# The manifest names the benchmark's source: a stub stands in for it too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches/bench \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/bench/main.rs \
    && cargo build --release --locked \
    && rm -rf src

# Then archmerge itself. COPY keeps the context's mtimes, which can be older
# than the stub build: touch so cargo rebuilds the crate.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

# === runtime ===
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin archmerge
COPY --from=build /src/target/release/archmerge /usr/local/bin/archmerge
# The commented reference configuration, for `--config` or ARCHMERGE_CONFIG.
COPY config/archmerge.toml /etc/archmerge/archmerge.toml.example

# Listen on every interface inside the container. The admin listener stays
# on loopback (the HEALTHCHECK reaches it there); to publish it, set
# ARCHMERGE_ADMIN_LISTEN=0.0.0.0:5081 together with ARCHMERGE_ADMIN_TOKEN
# (archmerge refuses a non-loopback admin listener without a token), as
# docker-compose.yml and deploy/kubernetes/ do. No upstream is set here:
# give ARCHMERGE_UPSTREAM or `upstream` in a --config file (the environment
# wins over the file, so these ENV lines override `listen` and
# `admin_listen` of a file; -e overrides them).
ENV ARCHMERGE_LISTEN=0.0.0.0:5080 \
    ARCHMERGE_ADMIN_LISTEN=127.0.0.1:5081 \
    RUST_LOG=info

USER archmerge
EXPOSE 5080 5081
# /healthz on the admin listener, over bash's /dev/tcp (the image has no
# curl); the port is the one ARCHMERGE_ADMIN_LISTEN names.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${ARCHMERGE_ADMIN_LISTEN##*:} && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && read -r status <&3 && [[ $status == *' 200 '* ]]"]
ENTRYPOINT ["archmerge", "serve"]
