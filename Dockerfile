# One image with both binaries: modelcache-operator and modelcache-agent.
#   docker build -t ghcr.io/modelcache/modelcache:0.1.0 .
# (CPU build; a CUDA build adds `--features cuda` on a CUDA base image.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p modelcache-operator -p modelcache-agent

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/modelcache-operator /src/target/release/modelcache-agent /usr/local/bin/
# Large allocations bypass glibc's heap, so model switching cannot fragment it.
ENV MALLOC_MMAP_THRESHOLD_=1048576
USER 65532:65532
ENTRYPOINT ["modelcache-agent"]
