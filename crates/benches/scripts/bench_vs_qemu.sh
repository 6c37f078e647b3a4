#!/usr/bin/env bash
# `qcow2 bench` against `qemu-img bench`, same command line, interleaved,
# with a noise row (qemu-img against itself), on a 4 GiB image.
#
#   crates/benches/scripts/bench_vs_qemu.sh DIR RUNS COUNT > table.md
set -euo pipefail
dir=$1; runs=$2; count=$3
here=$(cd "$(dirname "$0")" && pwd)
qcow2=${QCOW2:-$here/../../../target/release/qcow2}
cd "$dir"

seconds() { "$@" 2>/dev/null | awk '/Run completed in/ {print $4}'; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

echo "| job ($count requests of 4 KiB) | qemu-img bench | qcow2 bench | qcow2 / qemu-img (time) | noise |"
echo "|---|---|---|---|---|"
row() { # LABEL IMAGE_OPTS_OURS ARGS...
    local label=$1 ours_opts=$2; shift 2
    local q=() o=()
    for ((i = 0; i < runs; i++)); do
        rm -f q.qcow2 o.qcow2
        qemu-img create -q -f qcow2 q.qcow2 4G
        "$qcow2" create -q -o "$ours_opts" o.qcow2 4G
        if [[ " $* " != *" -w "* ]]; then # reads need data
            qemu-io -c "write -P 1 0 1G" q.qcow2 >/dev/null
            qemu-io -c "write -P 1 0 1G" o.qcow2 >/dev/null 2>&1 ||
                "$qcow2" bench -q -w --pattern 1 -c 262144 -d 32 -s 4k o.qcow2
        fi
        q+=("$(seconds qemu-img bench "$@" q.qcow2)")
        o+=("$(seconds "$qcow2" bench "${@//--dup=50/}" $([[ "$label" == *dup* ]] && echo --dup 50) o.qcow2)")
    done
    local mq mo odd even
    mq=$(printf '%s\n' "${q[@]}" | median); mo=$(printf '%s\n' "${o[@]}" | median)
    odd=$(printf '%s\n' "${q[@]}" | awk 'NR%2==1' | median)
    even=$(printf '%s\n' "${q[@]}" | awk 'NR%2==0' | median)
    awk -v l="$label" -v a="$mq" -v b="$mo" -v o="$odd" -v e="$even" \
        'BEGIN {printf "| %s | %.3f s (%.0f/s) | %.3f s (%.0f/s) | %.2f | %.2f |\n", l, a, '"$count"'/a, b, '"$count"'/b, b / a, (e > 0 ? o / e : 0)}'
}
row "read, depth 1" "cluster_size=64k" -c "$count" -d 1 -s 4k
row "read, depth 32" "cluster_size=64k" -c "$count" -d 32 -s 4k
row "write, depth 1" "cluster_size=64k" -c "$count" -d 1 -s 4k -w
row "write, depth 32" "cluster_size=64k" -c "$count" -d 32 -s 4k -w
row "write, depth 1, ours dedup 4k clusters 50 % dup vs plain" "dedup=on,cluster_size=4k" -c "$count" -d 1 -s 4k -w
rm -f q.qcow2 o.qcow2
