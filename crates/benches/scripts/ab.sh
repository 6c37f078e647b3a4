#!/usr/bin/env bash
# Interleaved A/B timing of two commands, with a noise row.
#
#   ab.sh RUNS PREP -- A_CMD... -- B_CMD...
#
# Runs A, B, A, B, ... RUNS times each (PREP, e.g. removing the output,
# runs untimed before every run), then prints one Markdown row:
# median wall time of A, of B, the ratio B/A, and the noise: the ratio of
# the medians of A's odd and even runs (A against itself). A ratio inside
# the noise is not a difference.
set -euo pipefail
runs=$1; prep=$2; shift 2
[ "$1" = "--" ] && shift
a=(); while [ "$1" != "--" ]; do a+=("$1"); shift; done; shift
b=("$@")

wall() { # prints seconds of wall time of "$@"
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" 'BEGIN {printf "%.4f\n", e - s}'
}
median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

ta=(); tb=()
eval "$prep"; wall "${a[@]}" >/dev/null # warm-up, untimed
eval "$prep"; wall "${b[@]}" >/dev/null
for ((i = 0; i < runs; i++)); do
    eval "$prep"; ta+=("$(wall "${a[@]}")")
    eval "$prep"; tb+=("$(wall "${b[@]}")")
done
ma=$(printf '%s\n' "${ta[@]}" | median)
mb=$(printf '%s\n' "${tb[@]}" | median)
odd=$(printf '%s\n' "${ta[@]}" | awk 'NR%2==1' | median)
even=$(printf '%s\n' "${ta[@]}" | awk 'NR%2==0' | median)
awk -v a="$ma" -v b="$mb" -v o="$odd" -v e="$even" \
    'BEGIN {printf "| %.3f s | %.3f s | %.2f | %.2f |\n", a, b, b / a, e / o}'
