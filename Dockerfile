# syntax=docker/dockerfile:1
# One image for every Propolis service, as Cilium ships one agent image: the suite's console scripts
# (propolis-k8s-watcher, propolis-datapath-writer, ...), the `propolis` CLI (the chart's bootstrap Job),
# Debian's bcc (the datapath-writer compiles bpf/bpf_lxc.c on each node against the node's kernel
# headers, which the chart mounts from the host), and a self-contained propolis-cni binary that the
# datapath-writer's install-cni step copies onto the node.
#
# No container engine runs on the development machines: tests/chart/test_dockerfile.py lints this file
# with hadolint and checks that every path it copies exists. Tilt (tilt/Tiltfile) builds it on kind.

ARG BASE=debian:bookworm-slim

# --- propolis-cni as one executable: the node has no Python, the runtime execs it from /opt/cni/bin --------
FROM ${BASE} AS cni
# Debian's stable point releases move these versions; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir pyinstaller==6.11.1
# The plugin is standard library only (libs/propolis/cni/plugin.py says why).
COPY libs/propolis/cni/plugin.py /src/propolis-cni.py
RUN /opt/build/bin/pyinstaller --onefile --strip --name propolis-cni --distpath /out --workpath /tmp/build \
      /src/propolis-cni.py

# --- the services ---------------------------------------------------------------------------------------
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc iproute2 wireguard-tools \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin propolis
WORKDIR /opt/propolis/src
COPY pyproject.toml README.md ./
COPY libs/ libs/
COPY services/ services/
COPY bpf/ bpf/
# Editable install: the source tree stays where Tilt's live_update syncs libs/ and services/ into, and
# the datapath finds bpf/ beside libs/ as in a checkout. --system-site-packages: Debian's bcc.
RUN python3 -m venv --system-site-packages /opt/propolis/venv \
 && /opt/propolis/venv/bin/pip install --no-cache-dir --editable /opt/propolis/src
COPY --from=cni /out/propolis-cni /opt/propolis/cni/propolis-cni
ENV PATH=/opt/propolis/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
# Services that need no privileges run as this user; the chart runs the per-node ones as root with
# only the capabilities each needs.
USER 65532:65532
CMD ["propolis", "--help"]
