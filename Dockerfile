# Multi-stage build of the three binaries: api, syncd, and the MAX simulator maxsim.
#   docker build -t participants .
#   docker run participants serve            (the api; ENTRYPOINT is api)
#   docker run --entrypoint syncd participants run

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own: a change of our code reuses it and compiles only
# the workspace's crates. The stand-in sources have the real targets (empty libs and mains), so
# this builds every dependency of the three binaries with the release profile.
COPY Cargo.toml Cargo.lock ./
COPY api/Cargo.toml api/Cargo.toml
COPY syncd/Cargo.toml syncd/Cargo.toml
COPY shared/Cargo.toml shared/Cargo.toml
COPY testkit/Cargo.toml testkit/Cargo.toml
COPY maxsim/Cargo.toml maxsim/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
RUN for crate in api syncd shared testkit maxsim; do mkdir -p $crate/src && touch $crate/src/lib.rs; done \
    && for crate in api syncd maxsim bench; do mkdir -p $crate/src && echo 'fn main() {}' > $crate/src/main.rs; done \
    && cargo build --release --locked -p api -p syncd -p maxsim \
    && rm -rf api/src syncd/src shared/src testkit/src maxsim/src bench/src
COPY . .
# COPY keeps the files' own times, which may be older than the stand-ins' build: touch them so
# cargo rebuilds the workspace's crates (and nothing else).
RUN find api syncd shared testkit maxsim bench migrations -type f -exec touch {} + \
    && cargo build --release --locked -p api -p syncd -p maxsim

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home participants
COPY --from=build /src/target/release/api /src/target/release/syncd /src/target/release/maxsim /usr/local/bin/
USER 10001
ENV LOG_FORMAT=json
EXPOSE 8082 9091
ENTRYPOINT ["/usr/local/bin/api"]
CMD ["serve"]
