#!/usr/bin/env bash
# Overwrites in place on a dedup image (every cluster owned alone, each
# write new unique content, the second pass shifted by one request so every
# write changes its cluster: the path that drops a cluster's dedup entry
# before rewriting it), timed for two qcow2 builds against qemu-img bench
# overwriting a plain image, interleaved, with a noise row (qemu-img
# against itself). Each row runs at COUNT and at 4 x COUNT requests.
#
#   crates/benches/scripts/dedup_overwrite.sh DIR RUNS COUNT OLD_QCOW2 NEW_QCOW2 > table.md
set -euo pipefail
dir=$1; runs=$2; count=$3; old=$4; new=$5
cd "$dir"

seconds() { "$@" 2>/dev/null | awk '/Run completed in/ {print $4}'; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

echo "| job (4 KiB writes over written clusters) | requests | qemu-img bench (plain) | qcow2 before | qcow2 now | now / before | now / qemu-img | noise |"
echo "|---|---|---|---|---|---|---|---|"
row() { # LABEL CLUSTER COUNT
    local label=$1 cluster=$2 n=$3
    local q=() a=() b=()
    local args=(-c "$n" -d 1 -s 4k -w)
    for ((i = 0; i < runs; i++)); do
        rm -f q.qcow2 a.qcow2 b.qcow2
        qemu-img create -q -f qcow2 -o cluster_size="$cluster" q.qcow2 4G
        "$new" create -q -o dedup=on,cluster_size="$cluster" a.qcow2 4G
        cp a.qcow2 b.qcow2
        qemu-img bench -q "${args[@]}" --pattern 1 q.qcow2 >/dev/null
        "$old" bench -q "${args[@]}" --dup 0 a.qcow2 >/dev/null
        "$new" bench -q "${args[@]}" --dup 0 b.qcow2 >/dev/null
        # Shifted by one request: every write changes what its cluster holds.
        q+=("$(seconds qemu-img bench "${args[@]}" -o 4096 --pattern 2 q.qcow2)")
        a+=("$(seconds "$old" bench "${args[@]}" -o 4096 --dup 0 a.qcow2)")
        b+=("$(seconds "$new" bench "${args[@]}" -o 4096 --dup 0 b.qcow2)")
    done
    local mq ma mb odd even
    mq=$(printf '%s\n' "${q[@]}" | median); ma=$(printf '%s\n' "${a[@]}" | median); mb=$(printf '%s\n' "${b[@]}" | median)
    odd=$(printf '%s\n' "${q[@]}" | awk 'NR%2==1' | median)
    even=$(printf '%s\n' "${q[@]}" | awk 'NR%2==0' | median)
    awk -v l="$label" -v n="$n" -v q="$mq" -v a="$ma" -v b="$mb" -v o="$odd" -v e="$even" \
        'BEGIN {printf "| %s | %d | %.3f s | %.3f s | %.3f s | %.2f | %.2f | %.2f |\n", l, n, q, a, b, b / a, b / q, (e > 0 ? o / e : 0)}'
}
for cluster in 4k 64k; do
    row "dedup, $cluster clusters" "$cluster" "$count"
    row "dedup, $cluster clusters" "$cluster" "$((4 * count))"
done
rm -f q.qcow2 a.qcow2 b.qcow2
