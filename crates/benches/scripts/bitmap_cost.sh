#!/usr/bin/env bash
# What one enabled persistent bitmap costs the write path: `qcow2 bench -w`
# (4 KiB writes, depth 1 and 32) into an image without a bitmap (A) and a
# copy with one enabled 64 KiB bitmap (B), interleaved (ab.sh: medians, B/A
# and a noise column, A against itself), each at two sizes 4x apart:
# overwrites of allocated clusters (the cheapest path, where a bitmap's
# cost shows most) and fresh allocations. Each run starts from fresh copies
# with nothing left to write back (sync), so one run's writeback does not
# land in the next.
#
#   bitmap_cost.sh DIR RUNS      (DIR: /dev/shm for tmpfs, or a disk)
set -euo pipefail
dir=$1; runs=${2:-7}
here=$(cd "$(dirname "$0")" && pwd)
q=${QCOW2:-$here/../../../target/release/qcow2}
ab=$here/ab.sh
work=$(mktemp -d "$dir/bitmap-cost.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "| job | no bitmap | one enabled bitmap | ratio | noise |"
echo "|---|---|---|---|---|"
for mib in 256 1024; do
    count=$((mib * 256))
    "$q" create -q -f qcow2 "$work/full.qcow2" 1G
    "$q" bench -w -c "$count" -s 4096 -d 32 "$work/full.qcow2" >/dev/null
    cp "$work/full.qcow2" "$work/full-bm.qcow2"
    "$q" bitmap --add "$work/full-bm.qcow2" bm0
    "$q" create -q -f qcow2 "$work/empty.qcow2" 1G
    cp "$work/empty.qcow2" "$work/empty-bm.qcow2"
    "$q" bitmap --add "$work/empty-bm.qcow2" bm0
    for depth in 1 32; do
        prep="cp $work/full.qcow2 $work/a.qcow2; cp $work/full-bm.qcow2 $work/b.qcow2; sync"
        printf '| overwrite %s MiB, 4 KiB writes, depth %s ' "$mib" "$depth"
        "$ab" "$runs" "$prep" -- "$q" bench -w -c "$count" -s 4096 -d "$depth" "$work/a.qcow2" \
            -- "$q" bench -w -c "$count" -s 4096 -d "$depth" "$work/b.qcow2"
        prep="cp $work/empty.qcow2 $work/a.qcow2; cp $work/empty-bm.qcow2 $work/b.qcow2; sync"
        printf '| allocate %s MiB, 4 KiB writes, depth %s ' "$mib" "$depth"
        "$ab" "$runs" "$prep" -- "$q" bench -w -c "$count" -s 4096 -d "$depth" "$work/a.qcow2" \
            -- "$q" bench -w -c "$count" -s 4096 -d "$depth" "$work/b.qcow2"
    done
    rm -f "$work"/*.qcow2
done
