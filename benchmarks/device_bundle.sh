#!/usr/bin/env bash
# Build .device/site.tar.xz: benchmarks/device-requirements.txt installed for CPython 3.12 on
# x86_64 Linux, as one archive for the device tool's `carry` (at most 64 MiB travel per call,
# the working tree included). Ray's wheel alone is 79 MB, so it is unpacked and its Java jar
# (32 MB compressed, unused: the pipeline's Ray is Python) and the dashboard's source maps are
# dropped; xz packs the rest into about 55 MB. On the GPU machine, benchmarks/device_run.sh
# unpacks it into /tmp/site and puts it on PYTHONPATH ahead of the image's packages.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
mkdir -p "$root/.device"
# the commit the results will be of: the device's copy of the tree has no .git
git -C "$root" rev-parse HEAD > "$root/.device/commit"
if [ "$root/.device/site.tar.xz" -nt "$root/benchmarks/device-requirements.txt" ]; then
    echo "reusing .device/site.tar.xz (newer than benchmarks/device-requirements.txt)"
    exit 0
fi
python3 -m pip install --quiet --no-deps --no-compile --only-binary=:all: --target "$site" \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
    -r "$root/benchmarks/device-requirements.txt"
rm -rf "$site/ray/jars"
find "$site" -name '*.js.map' -delete
XZ_OPT="-T0" tar -cJf "$root/.device/site.tar.xz" -C "$site" .
size=$(stat -c %s "$root/.device/site.tar.xz")
echo "wrote .device/site.tar.xz: $((size / 1048576)) MiB"
if [ "$size" -gt $((60 * 1048576)) ]; then
    echo "over 60 MiB: with the working tree it would not travel in one device call" >&2
    exit 1
fi
