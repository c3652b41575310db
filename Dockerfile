# The sightline binary: every service and the launcher. Protos compile with protox: no protoc needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sightline

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/sightline --create-home sightline \
    && chmod 700 /var/lib/sightline
COPY --from=build /src/target/release/sightline /usr/local/bin/sightline
USER sightline
ENV SIGHTLINE_DATA_DIR=/var/lib/sightline
VOLUME /var/lib/sightline
ENTRYPOINT ["sightline"]
