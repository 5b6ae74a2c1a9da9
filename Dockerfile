# One CPU image for both roles; the command picks the role (deploy/docker/entrypoint.sh):
#   docker build -t deepsplit:cpu .
#   docker run deepsplit:cpu deepsplit tiny-model --out /models/tiny --preset tiny --seed 0
#   docker run -p 31000:31000 deepsplit:cpu encode-server   --model DIR --config /etc/deepsplit/encode.yaml ...
#   docker run -p 30000:30000 deepsplit:cpu language-server --model DIR --config /etc/deepsplit/language.yaml ...
# bookworm, not the newer default Debian: its package names (libcurl4) are the ones Mooncake's wheel was
# checked against here. GPU images need a CUDA torch and the CUDA Mooncake build (see docs/deploy.md).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/deepsplit

# Libraries mooncake-transfer-engine-non-cuda links against (same list as scripts/sysdeps.sh).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs1 librdmacm1 libnuma1 liburing2 libcurl4 \
    && rm -rf /var/lib/apt/lists/*

# CPU torch first, from the CPU index, so `pip install .` finds torch==2.13.0 satisfied (2.13.0+cpu)
# instead of pulling the CUDA build from PyPI. A layer of its own: it changes least often.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/deepsplit
COPY pyproject.toml README.md ./
COPY deepsplit deepsplit
COPY transfer transfer
COPY encode_server encode_server
COPY language_server language_server
RUN pip install . && rm -rf build *.egg-info

# Default settings (Kubernetes mounts its ConfigMaps over this directory with the same files).
COPY configs/encode.yaml configs/language.yaml /etc/deepsplit/
COPY deploy/docker/entrypoint.sh /usr/local/bin/deepsplit-entrypoint

RUN useradd --uid 10001 --create-home --home-dir /home/deepsplit deepsplit \
    && mkdir -p /models && chown deepsplit:deepsplit /models
USER 10001
WORKDIR /home/deepsplit

# encode-server HTTP 31000, language-server HTTP (OpenAI API) 30000.
EXPOSE 30000 31000
ENTRYPOINT ["deepsplit-entrypoint"]
CMD ["language-server", "--help"]
