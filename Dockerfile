# One image for the whole suite: `sightline` (every service, `up`, `health`) and
# `sightline-companion`. Protos compile with protox: no protoc needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sightline --bin sightline-companion \
    && strip target/release/sightline target/release/sightline-companion

# A small runtime: Debian slim with CA certificates, a non-root user and nothing else.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/sightline --create-home sightline \
    && chmod 700 /var/lib/sightline \
    && install -d -m 700 -o sightline -g sightline /var/lib/sightline-companion \
    && install -d -m 700 -o sightline -g sightline /var/lib/sightline-shared
COPY --from=build /src/target/release/sightline /usr/local/bin/sightline
COPY --from=build /src/target/release/sightline-companion /usr/local/bin/sightline-companion
USER sightline
ENV SIGHTLINE_DATA_DIR=/var/lib/sightline \
    SIGHTLINE_COMPANION_HOME=/var/lib/sightline-companion
VOLUME /var/lib/sightline
EXPOSE 50051 50052 50053 50054 9151 9152 9153 9154 8080
ENTRYPOINT ["sightline"]
