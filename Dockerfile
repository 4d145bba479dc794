# elbasy in a container (README.md, "Running as a service"):
#   docker build -t elbasy .
#   docker run -d --name elbasy -p 8080:8080 -v elbasy-ca:/var/lib/elbasy \
#     --stop-timeout 45 elbasy --intercept '*.myshopify.com'
# Arguments after the image name are elbasy's options; the ELBASY_* variables
# below are its defaults here (change them with -e).

# ---- build: the wheel, with the compiler and OpenSSL headers the extensions need
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY ext ./ext
COPY elbasy ./elbasy
# elbasy's wheel and every dependency's, so the next stage installs offline
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- run: a slim Python with the wheels, no compiler
FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels elbasy \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /var/lib/elbasy --shell /usr/sbin/nologin elbasy \
 && install -d -o elbasy -g elbasy -m 0700 /var/lib/elbasy
COPY deploy/docker/healthcheck.py /usr/local/lib/elbasy-healthcheck.py

# all interfaces inside the container: publish the port only where clients are
# (e.g. -p 127.0.0.1:8080:8080), since elbasy is a forward proxy
ENV ELBASY_LISTEN=0.0.0.0:8080 \
    ELBASY_DATA_DIR=/var/lib/elbasy \
    ELBASY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
# the CA (its key and certificate), made on first run: keep it across containers
VOLUME /var/lib/elbasy
EXPOSE 8080
USER elbasy
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
  CMD ["python", "/usr/local/lib/elbasy-healthcheck.py"]
# SIGTERM drains (--drain-timeout, 30 s, then 10 s before stragglers are
# killed): give `docker stop` more than that with --stop-timeout 45
STOPSIGNAL SIGTERM
ENTRYPOINT ["elbasy"]
CMD ["--workers", "auto"]
