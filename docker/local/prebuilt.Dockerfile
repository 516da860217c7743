# The build-stage base of docker/Dockerfile for a haconfd built on this machine instead of in the
# image (the container tests use it: no Rust image can be pulled here, and Debian 12's Rust is too
# old for haconfd). The build context is a directory holding only the binary, named `haconfd`:
#
#   cp target/release/haconfd ctx/ && docker build -f docker/local/prebuilt.Dockerfile \
#       --build-arg BASE=haconfd-local/debian:bookworm -t haconfd-local/prebuilt ctx
#   docker build -f docker/Dockerfile --build-arg BUILD_BASE=haconfd-local/prebuilt \
#       --build-arg PREBUILT=/usr/local/lib/haconfd/haconfd \
#       --build-arg RUNTIME_BASE=haconfd-local/haproxy:2.6-bookworm -t haconfd .
#
# The binary must be linked against Debian 12's glibc or an older one (a host build on Debian 12).
ARG BASE=haconfd-local/debian:bookworm
FROM ${BASE}
COPY haconfd /usr/local/lib/haconfd/haconfd
RUN /usr/local/lib/haconfd/haconfd --version
