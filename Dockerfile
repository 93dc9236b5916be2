# syntax=docker/dockerfile:1.7
# Three images, one target each (the sidecar image holds two binaries, see build-sidecar):
#   docker buildx build --target webhook -t REGISTRY/multus-eni-webhook:TAG .
#   docker buildx build --target sidecar -t REGISTRY/multus-eni-sidecar:TAG .
#   docker buildx build --target agent   -t REGISTRY/multus-eni-agent:TAG .
# Add --build-arg MULTUS_ENI_GIT_COMMIT=$(git rev-parse --short HEAD) so that
# multus_eni_build_info names the commit (without it: "unknown").
# Multi-arch (amd64 + arm64/Graviton): add --platform linux/amd64,linux/arm64 --push
# (docs/install.md "Build the images"). Each platform compiles natively in its own build stage
# (QEMU or a native builder node); no cross toolchain is involved.
#
# The binaries link glibc (aws-lc-sys is C), so the runtime is distroless cc on the same Debian
# release as the build image: glibc and libgcc only, no shell, no package manager, uid 65532.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS source
# The commit for multus_eni_build_info{git_commit}: the build context has no .git, so build.rs
# reads it from here (`--build-arg MULTUS_ENI_GIT_COMMIT=$(git rev-parse --short HEAD)`).
ARG MULTUS_ENI_GIT_COMMIT=unknown
WORKDIR /src
COPY . .
ENV CARGO_TERM_COLOR=never \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    MULTUS_ENI_GIT_COMMIT=${MULTUS_ENI_GIT_COMMIT}

FROM source AS build-webhook
ARG TARGETPLATFORM
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=multus-eni-target-$TARGETPLATFORM,target=/src/target,sharing=locked \
    cargo build --release --locked -p multus-eni-webhook \
 && install -D -m 0755 target/release/multus-eni-webhook /out/multus-eni-webhook

# Two binaries for one image: the full sidecar (direct mode needs the AWS SDK) and the
# agent-mode one that the webhook injects by default (no SDK: a fraction of the size and RSS).
# Two cargo invocations on purpose: in one, the library's `direct` feature would be unified
# into the agent-mode build too. Profile release-sidecar (Cargo.toml): opt-level "z", since a
# sidecar runs in every pod (docs/benchmarks.md, "Binary size and memory").
FROM source AS build-sidecar
ARG TARGETPLATFORM
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=multus-eni-target-$TARGETPLATFORM,target=/src/target,sharing=locked \
    cargo build --profile release-sidecar --locked -p multus-eni-sidecar \
 && cargo build --profile release-sidecar --locked -p multus-eni-sidecar-agent-mode \
 && install -D -m 0755 target/release-sidecar/multus-eni-sidecar /out/multus-eni-sidecar \
 && install -D -m 0755 target/release-sidecar/multus-eni-sidecar-agent-mode /out/multus-eni-sidecar-agent-mode

FROM source AS build-agent
ARG TARGETPLATFORM
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=multus-eni-target-$TARGETPLATFORM,target=/src/target,sharing=locked \
    cargo build --release --locked -p multus-eni-agent \
 && install -D -m 0755 target/release/multus-eni-agent /out/multus-eni-agent

FROM gcr.io/distroless/cc-debian12:nonroot AS webhook
COPY --from=build-webhook /out/multus-eni-webhook /usr/local/bin/multus-eni-webhook
# Numeric, so kubelet can verify runAsNonRoot.
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/multus-eni-webhook"]
CMD ["--help"]

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build-sidecar /out/multus-eni-sidecar /usr/local/bin/multus-eni-sidecar
COPY --from=build-sidecar /out/multus-eni-sidecar-agent-mode /usr/local/bin/multus-eni-sidecar-agent-mode
USER 65532:65532
EXPOSE 9811
ENTRYPOINT ["/usr/local/bin/multus-eni-sidecar"]
CMD ["--help"]

# The node agent runs as root (uid 0) with SYS_ADMIN and SYS_PTRACE only (manifests/agent):
# it enters other pods' network namespaces. The image's user is root so the kubelet's
# runAsUser: 0 and the image agree.
FROM gcr.io/distroless/cc-debian12:latest AS agent
COPY --from=build-agent /out/multus-eni-agent /usr/local/bin/multus-eni-agent
USER 0:0
EXPOSE 9812
ENTRYPOINT ["/usr/local/bin/multus-eni-agent"]
CMD ["--help"]
