# imagine-bot on a CUDA GPU box.
#   docker build -t imagine-bot .
#   docker run --gpus all -e DISCORD_TOKEN -v imagine-data:/data -v imagine-models:/models imagine-bot
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/huggingface

RUN useradd --create-home --uid 1000 imagine \
    && mkdir -p /data /models \
    && chown imagine:imagine /data /models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY generation ./generation
# torch comes from the base image (CUDA build); the range in pyproject accepts it as installed.
RUN pip install . && rm -rf /root/.cache

COPY config.toml /app/config.toml
# The image's config points the data folder at the volume.
RUN sed -i -e 's|^data_dir = .*|data_dir = "/data"|' -e 's|^cache_dir = .*|cache_dir = "/models"|' /app/config.toml

USER imagine
VOLUME ["/data", "/models"]
ENTRYPOINT ["imagine-bot", "--config", "/app/config.toml"]
