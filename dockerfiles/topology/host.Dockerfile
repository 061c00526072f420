# The hosts of `gantry topology up` (control and workers): the dependencies' image
# (deps.Dockerfile) with Gantry's own wheel, built from this checkout, on top.
ARG DEPS_IMAGE
FROM ${DEPS_IMAGE}
COPY gantry-*.whl /tmp/
RUN /opt/gantry/bin/pip install --quiet --no-index --no-cache-dir --no-deps /tmp/gantry-*.whl \
 && rm /tmp/gantry-*.whl
CMD ["gantry", "--help"]
