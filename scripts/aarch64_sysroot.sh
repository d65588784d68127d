#!/usr/bin/env bash
# Build an aarch64 user-space root for tests/test_aarch64.py: Debian's arm64 Python 3.11, its
# headers (for compiling the C extensions) and its shared libraries (apt, into a private
# package-list cache: the host's dpkg is untouched), plus aarch64 wheels of numpy and
# onnxruntime unpacked into site-packages. The C extensions also need a cross compiler:
# apt-get install gcc-aarch64-linux-gnu.
#
#   scripts/aarch64_sysroot.sh [DEST]          # default $AARCH64_SYSROOT, which
#                                              # tests/test_aarch64.py reads, else
#                                              # ~/.cache/edge-exporter/aarch64
#   qemu-aarch64 -L DEST DEST/usr/bin/python3.11 -c "import onnxruntime"
#
# Needs apt-get (Debian 12 / bookworm package names), pip, and network access to both.
set -euo pipefail
DEST=${1:-${AARCH64_SYSROOT:-$HOME/.cache/edge-exporter/aarch64}}
ONNXRUNTIME=${ONNXRUNTIME_VERSION:-$(python -c 'import onnxruntime; print(onnxruntime.__version__)')}
NUMPY=${NUMPY_VERSION:-$(python -c 'import numpy; print(numpy.__version__)')}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The Python interpreter, its headers and the shared libraries it, numpy and onnxruntime load.
PACKAGES="libc6 libgcc-s1 libstdc++6 python3.11-minimal libpython3.11-minimal libpython3.11-dev
libpython3.11-stdlib libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1
libcrypt1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libdb5.3 libgdbm6 libnsl2
libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1"
APT=(-o APT::Architectures=arm64 -o APT::Architecture=arm64
     -o Dir::State::Lists="$WORK/lists" -o Dir::Cache="$WORK/cache")
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs" "$DEST"
apt-get "${APT[@]}" update -qq
(cd "$WORK/debs" && apt-get "${APT[@]}" download $PACKAGES)
for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$DEST"; done

# qemu-user 7.x passes the host's /proc/cpuinfo through, and onnxruntime's cpuinfo library
# crashes parsing x86 text as ARM. qemu looks up absolute paths under -L first, so an ARM
# cpuinfo in the root (a Cortex-A76 with the dot-product extension) is what the guest sees.
mkdir -p "$DEST/proc"
printf '%s\n' "processor	: 0" "BogoMIPS	: 50.00" \
    "Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" \
    "CPU implementer	: 0x41" "CPU architecture: 8" "CPU variant	: 0x4" "CPU part	: 0xd0b" \
    "CPU revision	: 1" "" > "$DEST/proc/cpuinfo"

SITE="$DEST/usr/lib/python3.11/site-packages"
mkdir -p "$SITE"
pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    "numpy==$NUMPY" "onnxruntime==$ONNXRUNTIME" -d "$WORK/wheels"
for wheel in "$WORK"/wheels/*.whl; do python -m zipfile -e "$wheel" "$SITE"; done
echo "$DEST"
