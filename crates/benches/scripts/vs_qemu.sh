#!/usr/bin/env bash
# Side-by-side benchmark of the qcow2 tool against qemu-img, interleaved,
# with a noise row per job (qemu-img against itself), at two sizes.
#
#   crates/benches/scripts/vs_qemu.sh DIR RUNS SMALL_MIB LARGE_MIB > table.md
#
# DIR: where the inputs and outputs live (tmpfs such as /dev/shm for the
# CPU work with the page cache warm, or a directory on the disk). Inputs:
# random data, an ext4 image of real files (mke2fs -d over /usr), and a
# 50 %-duplicate image (every other 64 KiB repeats one of 16 blocks).
# Prints Markdown: per job and size, median wall time of qemu-img and of
# qcow2, their ratio, and the noise (ratio of qemu-img's odd-run median to
# its even-run median). Needs qemu-img and a release build of qcow2.
set -euo pipefail
dir=$1; runs=$2; small=$3; large=$4
here=$(cd "$(dirname "$0")" && pwd)
ab="$here/ab.sh"
qcow2=${QCOW2:-$here/../../../target/release/qcow2}
cd "$dir"

make_inputs() { # SIZE_MIB
    local mib=$1
    [ -f "rand-$mib.raw" ] || head -c "${mib}M" /dev/urandom > "rand-$mib.raw"
    if [ ! -f "ext4-$mib.raw" ]; then
        # Real files, as many as fit: a file system image of MIB MiB.
        mke2fs -q -F -t ext4 -b 4096 -d /usr/share "ext4-$mib.raw" "${mib}M" >/dev/null 2>&1 ||
            mke2fs -q -F -t ext4 -b 4096 -d /usr/share/doc "ext4-$mib.raw" "${mib}M" >/dev/null
    fi
    if [ ! -f "dup50-$mib.raw" ]; then
        head -c 1M /dev/urandom > blocks.bin
        python3 - "$mib" <<'PY'
import os, sys
mib = int(sys.argv[1])
blocks = open("blocks.bin", "rb").read()
with open(f"dup50-{mib}.raw", "wb") as out:
    for i in range(mib * 16):
        if i % 2:
            k = (i * 7919) % 16
            out.write(blocks[k * 65536:(k + 1) * 65536])
        else:
            out.write(os.urandom(65536))
PY
    fi
}

row() { # LABEL PREP -- A... -- B...
    local label=$1; shift
    printf '| %s ' "$label"
    "$ab" "$runs" "$@"
}

echo "| job | qemu-img | qcow2 | qcow2 / qemu-img | noise |"
echo "|---|---|---|---|---|"
for mib in "$small" "$large"; do
    make_inputs "$mib"
    for cs in 64k 4k; do
        row "raw → qcow2, $cs clusters, $mib MiB random" "rm -f q.qcow2 o.qcow2" -- \
            qemu-img convert -t writeback -f raw -O qcow2 -o cluster_size=$cs "rand-$mib.raw" q.qcow2 -- \
            "$qcow2" convert -f raw -O qcow2 -o cluster_size=$cs "rand-$mib.raw" o.qcow2
        row "raw → qcow2 dedup=on vs qemu-img plain, $cs, $mib MiB random" "rm -f q.qcow2 o.qcow2" -- \
            qemu-img convert -t writeback -f raw -O qcow2 -o cluster_size=$cs "rand-$mib.raw" q.qcow2 -- \
            "$qcow2" convert -f raw -O qcow2 -o cluster_size=$cs,dedup=on "rand-$mib.raw" o.qcow2
    done
    row "raw → qcow2 dedup=on vs qemu-img plain, 4k, $mib MiB ext4 of real files" "rm -f q.qcow2 o.qcow2" -- \
        qemu-img convert -t writeback -f raw -O qcow2 -o cluster_size=4k "ext4-$mib.raw" q.qcow2 -- \
        "$qcow2" convert -f raw -O qcow2 -o cluster_size=4k,dedup=on "ext4-$mib.raw" o.qcow2
    row "raw → qcow2 dedup=on vs qemu-img plain, 64k, $mib MiB 50 % duplicate" "rm -f q.qcow2 o.qcow2" -- \
        qemu-img convert -t writeback -f raw -O qcow2 "dup50-$mib.raw" q.qcow2 -- \
        "$qcow2" convert -f raw -O qcow2 -o dedup=on "dup50-$mib.raw" o.qcow2
    qemu-img convert -f raw -O qcow2 -o cluster_size=4k "rand-$mib.raw" src.qcow2
    row "qcow2 (4k clusters) → raw, $mib MiB" "rm -f q.raw o.raw" -- \
        qemu-img convert -t writeback -f qcow2 -O raw src.qcow2 q.raw -- \
        "$qcow2" convert -f qcow2 -O raw src.qcow2 o.raw
    row "check (4k clusters), $mib MiB" "true" -- \
        qemu-img check src.qcow2 -- "$qcow2" check src.qcow2
    rm -f q.qcow2 o.qcow2 q.raw o.raw src.qcow2
done
