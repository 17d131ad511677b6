# Multi-stage build. The default target is the runtime image: api and syncd on a distroless
# base (no shell, no package manager; glibc, CA certificates), stripped, with OCI labels. The
# MAX simulator is not in it: it has its own target, for the compose demo and tests.
#   docker build --build-arg GIT_SHA=$(git rev-parse HEAD) -t participants:0.1.0 .
#   docker run participants:0.1.0 serve              (the api; ENTRYPOINT is api)
#   docker run --entrypoint /usr/local/bin/syncd participants:0.1.0 run
#   docker build --target maxsim -t participants-maxsim:0.1.0 .
#
# Base images are pinned by digest (a tag can be re-pushed under the same name). The Rust
# version is rust-toolchain.toml's; check-ops checks the two agree. To move to newer bases:
# `docker buildx imagetools inspect <image:tag>` gives the index digest to put after the tag.
# The two digests below are those that several independent public repositories pin for these
# tags; they were not read from the registries themselves (the machine this was written on has
# no engine and no registry access): confirm them with that command before the first release.

ARG RUST_IMAGE=rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

FROM ${RUST_IMAGE} AS build
# Stripped binaries (no symbol tables in the image); the workspace's release profile keeps
# them, for profiling the benchmarks.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
WORKDIR /src
# Dependencies first, in a layer of their own: a change of our code reuses it and compiles only
# the workspace's crates. The stand-in sources have the real targets (empty libs and mains), so
# this builds every dependency of the three binaries with the release profile.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
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
# The commit the image is built from: in participants_build_info{revision} and the OCI labels
# (declared after the dependency layer, so a new commit does not rebuild the dependencies).
ARG GIT_SHA=unknown
ENV PARTICIPANTS_GIT_SHA=${GIT_SHA}
COPY . .
# COPY keeps the files' own times, which may be older than the stand-ins' build: touch them so
# cargo rebuilds the workspace's crates (and nothing else).
RUN find api syncd shared testkit maxsim bench migrations -type f -exec touch {} + \
    && cargo build --release --locked -p api -p syncd -p maxsim

# The simulator, for `docker compose --profile sim` and tests only; never deployed.
FROM ${RUNTIME_IMAGE} AS maxsim
COPY --from=build /src/target/release/maxsim /usr/local/bin/
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/maxsim"]

# The runtime (last, so the default target). Health checks are the binaries' own subcommands
# (`api health`, `syncd health`): nothing here needs a shell.
FROM ${RUNTIME_IMAGE} AS runtime
ARG GIT_SHA=unknown
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="participants" \
      org.opencontainers.image.description="Participant counts of MAX messenger chats: the read-only api and the sync daemon syncd" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /src/target/release/api /src/target/release/syncd /usr/local/bin/
# The uid the Kubernetes manifests run as (runAsUser: 10001); no passwd entry is needed.
USER 10001:10001
ENV LOG_FORMAT=json
EXPOSE 8082 9091
ENTRYPOINT ["/usr/local/bin/api"]
CMD ["serve"]
