# imagine-bot on a CUDA GPU box (needs the NVIDIA Container Toolkit on the host for --gpus).
#   docker build -t imagine-bot .
#   docker run --gpus all --stop-timeout 60 -e DISCORD_TOKEN \
#     -v "$PWD/config.toml:/config/config.toml:ro" \
#     -v imagine-data:/data -v imagine-models:/models imagine-bot
# torch 2.6 or newer: transformers 5 refuses older releases.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/huggingface

RUN useradd --create-home --uid 1000 imagine \
    && mkdir -p /data /models /config \
    && chown imagine:imagine /data /models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY generation ./generation
# torch comes from the base image (CUDA build); the range in pyproject accepts it as installed.
RUN pip install . && rm -rf /root/.cache

# A default config so the image starts as it is (tiny model); mount your own over it. Its paths
# point at the volumes, and a mounted config should do the same.
COPY config.toml /config/config.toml
RUN sed -i -e 's|^data_dir = .*|data_dir = "/data"|' -e 's|^cache_dir = .*|cache_dir = "/models"|' \
    /config/config.toml
# Metrics and health checks on (the HEALTHCHECK below asks /healthz); a mounted config should
# enable [metrics] as well.
RUN printf '\n[metrics]\nenabled = true\nhost = "0.0.0.0"\nport = 9464\n' >> /config/config.toml

USER imagine
VOLUME ["/data", "/models"]
EXPOSE 9464
# /healthz answers while the event loop does; the image has no curl, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"
# SIGTERM drains running jobs for drain_timeout_s (30 s by default): give `docker stop` longer.
STOPSIGNAL SIGTERM
ENTRYPOINT ["imagine-bot", "--config", "/config/config.toml"]
