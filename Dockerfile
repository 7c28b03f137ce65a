# Build (from the repository root):  docker build -t sdn-dist:0.1.0 .
# Check:                              docker run --rm sdn-dist:0.1.0
#
# One image for every node of a Ray cluster running sdn-dist (KubeRay head, workers and the
# RayJob submitter; see k8s/). It holds the package and its dependencies; Ray's version is pinned
# here and must equal rayVersion in k8s/base/rayjob.yaml. On x86_64, PyPI's torch wheel bundles
# the CUDA runtime, so the same image serves CPU and NVIDIA GPU nodes (the node supplies the
# driver).
FROM python:3.11-slim

ARG RAY_VERSION=2.60.0
# Optional: a pip index to take torch/torchvision from first (e.g. PyTorch's CPU-only wheel
# index, for a much smaller image for CPU clusters). Empty: PyPI's default (CUDA) build.
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's exec probes (Ray < 2.53, or older operators) run `wget` against the raylet and
# the dashboard; newer ones probe over HTTP. bash is in the base image (KubeRay runs bash -lc).
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Non-root user 1000 (the pods' runAsUser), home /home/sdn.
RUN groupadd --gid 1000 sdn \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash sdn

WORKDIR /opt/sdn-dist
COPY pyproject.toml README.md ./
COPY sdn_dist ./sdn_dist
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch torchvision; fi \
    && pip install . "ray[default,train]==${RAY_VERSION}" \
    && sdn-dist --help >/dev/null

USER 1000:1000
WORKDIR /home/sdn
ENV HOME=/home/sdn

# No ENTRYPOINT: KubeRay and `ray up` run their own commands (ray start ...) in the container.
CMD ["sdn-dist", "--help"]
