# streamproc image: CPU torch (the CUDA build from PyPI is several GB and useless without
# a GPU). Build: docker build -t streamproc . ; the compose stack builds it for you.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends libportaudio2 flite espeak-ng \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
# torch from the CPU wheel index; everything else exactly as locked, minus the CUDA wheels
RUN pip install --no-cache-dir torch==2.15.0 --index-url https://download.pytorch.org/whl/cpu \
 && grep -v -E '^(torch|triton|nvidia-|cuda-)' requirements.lock > /tmp/req.txt \
 && pip install --no-cache-dir -r /tmp/req.txt

COPY streamproc ./streamproc
RUN pip install --no-cache-dir --no-deps .

ENV STREAMPROC_CACHE=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]
ENTRYPOINT ["streamproc"]
CMD ["--help"]
