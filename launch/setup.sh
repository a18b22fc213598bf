#!/usr/bin/env bash
# Set-up on a fresh Debian/Ubuntu machine: the offline corpora (Debian packages) and a virtual
# environment with tmdm installed in editable mode. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="fortunes bible-kjv espeak-ng adwaita-icon-theme"
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "installing system packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# TMDM_EXTRAS: the optional extras to install (launch/test.sh adds `export`: torch CPU, transformers and
# lm-eval for the PyTorch reference and `tmdm lm-eval`; and `tpu`: libtpu, ~680 MB, so that
# `tmdm compile-check --topology` compiles for TPU chips on this host and its tests run).
.venv/bin/pip install -q --disable-pip-version-check -e ".[${TMDM_EXTRAS:-test}]"
