# Deliberately bad (contract test input for `trivy config`): a floating tag, root,
# sudo, an exposed SSH port, apt-get without --no-install-recommends, no HEALTHCHECK.
FROM debian:latest
RUN apt-get update && apt-get install -y curl sudo
RUN sudo chmod 777 /opt
EXPOSE 22
CMD ["bash"]
