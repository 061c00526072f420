# The dependencies of the topology's hosts (`gantry topology up`): the topology's base image
# (Debian's python3.11, PostgreSQL, registry, Prometheus, iptables; made by debootstrap, see
# gantry/localenv/baseimages.py) with uv.lock's pins installed from the project's wheelhouse.
# The context: requirements.txt (those pins for this image, with their hashes) and
# wheelhouse/. Rebuilt only when the lock changes; host.Dockerfile adds Gantry on top.
# One stage: copying the installed tree out of a second one took longer (minutes on 2
# cores) than the wheels' layer costs in disk.
FROM gantry/topology-host-base:bookworm
COPY requirements.txt /tmp/requirements.txt
COPY wheelhouse/ /tmp/wheelhouse/
RUN python3 -m venv /opt/gantry \
 && /opt/gantry/bin/pip install --quiet --no-index --no-cache-dir --find-links /tmp/wheelhouse \
        --require-hashes -r /tmp/requirements.txt
ENV PATH=/opt/gantry/bin:/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
