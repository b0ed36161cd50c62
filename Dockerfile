# syntax=docker/dockerfile:1
# Carina: DICOMweb archive that de-identifies (PS3.15) what it receives.
#   docker build -t carina .
#   docker run -p 8080:8080 -v carina-data:/data carina    (embedded PostgreSQL, files in /data)
# docker-compose.yml runs it with PostgreSQL and MinIO instead.

# Build stage: install Carina and its dependencies into a venv that is copied whole into the image,
# so the final image holds no source tree and no build leftovers.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/carina
WORKDIR /src
# Only what `pip install .` needs (pyproject.toml maps these folders into the `carina` package).
COPY pyproject.toml README.md ./
COPY carina/ carina/
COPY archive/ archive/
COPY curation/ curation/
COPY api/ api/
COPY migrations/ migrations/
COPY deid_profiles/ deid_profiles/
RUN /opt/carina/bin/pip install .

FROM python:3.11-slim
# tesseract reads burned-in text in the pixels (the burned-in text rule; curation/ocr.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tesseract-ocr tesseract-ocr-eng \
 && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid: the embedded PostgreSQL (used when DATABASE_URL is unset) refuses root, and
# the intake area under /data holds identified bytes while an instance is processed.
RUN groupadd --system --gid 10001 carina \
 && useradd --system --uid 10001 --gid carina --create-home --home-dir /home/carina carina \
 && mkdir /data \
 && chown carina:carina /data
COPY --from=build /opt/carina /opt/carina

ENV PATH=/opt/carina/bin:$PATH \
    PYTHONUNBUFFERED=1
# Carina's own settings (carina/settings.py): listen beyond the container's loopback, keep data in
# the volume.
ENV CARINA_HOST=0.0.0.0 \
    CARINA_DATA_DIR=/data

# Declared after the chown so a new named volume starts owned by carina.
VOLUME ["/data"]
USER carina
WORKDIR /home/carina

# 8080: HTTP (DICOMweb at /dicomweb); 11112: DICOM (DIMSE) listener.
EXPOSE 8080 11112

# /healthz answers once start-up (database, migrations, object store) has finished.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CARINA_PORT', '8080') + '/healthz', timeout=4)"]

CMD ["carina", "serve"]
