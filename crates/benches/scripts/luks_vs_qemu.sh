#!/usr/bin/env bash
# convert of a raw disk into an encrypted qcow2 image (LUKS aes-256-xts,
# QEMU's default cipher), qcow2 against qemu-img side by side: ab.sh
# interleaves them and gives the ratio and the noise (qemu-img against
# itself), at two sizes 4x apart.
#
#   luks_vs_qemu.sh DIR RUNS      (DIR: /dev/shm for tmpfs, or a disk)
set -euo pipefail
dir=$1; runs=${2:-5}
here=$(cd "$(dirname "$0")" && pwd)
q=${QCOW2:-$here/../../../target/release/qcow2}
ab=$here/ab.sh
work=$(mktemp -d "$dir/luks-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
secret="secret,id=sec0,data=benchmark passphrase"
opts="encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"

echo "| job | qemu-img | qcow2 | qcow2 / qemu-img | noise |"
echo "|---|---|---|---|---|"
for mib in 256 1024; do
    head -c $((mib << 20)) /dev/urandom > "$work/in.raw"
    printf '| raw → qcow2 LUKS aes-256-xts, %s MiB random ' "$mib"
    "$ab" "$runs" "rm -f $work/out.qcow2" \
        -- qemu-img convert --object "$secret" -O qcow2 -o "$opts" "$work/in.raw" "$work/out.qcow2" \
        -- "$q" convert --object "$secret" -O qcow2 -o "$opts" "$work/in.raw" "$work/out.qcow2"
    qemu-img convert --object "$secret" -O qcow2 -o "$opts" "$work/in.raw" "$work/src.qcow2"
    printf '| qcow2 LUKS aes-256-xts → raw, %s MiB ' "$mib"
    "$ab" "$runs" "rm -f $work/out.raw" \
        -- qemu-img convert --object "$secret" --image-opts "driver=qcow2,file.filename=$work/src.qcow2,encrypt.key-secret=sec0" -O raw "$work/out.raw" \
        -- "$q" convert --object "$secret" --image-opts "driver=qcow2,file.filename=$work/src.qcow2,encrypt.key-secret=sec0" -O raw "$work/out.raw"
    rm -f "$work"/*.qcow2 "$work"/*.raw
done
