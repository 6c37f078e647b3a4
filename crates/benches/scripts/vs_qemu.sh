#!/usr/bin/env bash
# Side-by-side benchmark of the qcow2 tool against qemu-img, interleaved,
# with a noise row per job (qemu-img against itself), at two sizes.
#
#   crates/benches/scripts/vs_qemu.sh DIR RUNS SMALL_MIB LARGE_MIB > table.md
#
# DIR: where the inputs and outputs live (tmpfs such as /dev/shm for the
# CPU work with the page cache warm, or a directory on the disk). Inputs:
# random data, an ext4 image of real files (mke2fs -d over a tree of this
# machine's files), and a 50 %-duplicate image (every other 64 KiB
# repeats one of 16 blocks). A reference row per size times `dd` writing
# as many bytes into one new file: on tmpfs, the least time any converter
# can take.
# Prints Markdown: per job and size, median wall time of qemu-img and of
# qcow2, their ratio, and the noise (ratio of qemu-img's odd-run median to
# its even-run median). Needs qemu-img and a release build of qcow2.
#
# With INTO=BENCHMARKS.md SECTION=NAME the table also replaces the lines
# between `<!-- vs_qemu NAME -->` and `<!-- /vs_qemu NAME -->` in that file.
set -euo pipefail
dir=$1; runs=$2; small=$3; large=$4
here=$(cd "$(dirname "$0")" && pwd)
ab="$here/ab.sh"
qcow2=${QCOW2:-$here/../../../target/release/qcow2}
into=""
if [ -n "${INTO:-}" ]; then
    into=$(realpath "$INTO")
    : "${SECTION:?INTO needs SECTION, the name in the markers}"
    grep -qF -- "<!-- vs_qemu $SECTION -->" "$into" ||
        { echo "no <!-- vs_qemu $SECTION --> marker in $into" >&2; exit 2; }
    table=$(mktemp)
    trap 'rm -f "$table"' EXIT
    exec 3>&1 > >(tee "$table" >&3)
fi
cd "$dir"

# Real files for the ext4 image: the largest tree here that fills at most
# three quarters of an image of MIB MiB.
files_for() { # SIZE_MIB
    local mib=$1 tree
    for tree in /usr/lib "${HOME:-/root}/.rustup" /usr/share /usr/share/doc /etc; do
        [ -d "$tree" ] || continue
        if [ "$(du -sm "$tree" 2>/dev/null | cut -f1)" -le $((mib * 3 / 4)) ]; then
            echo "$tree"
            return
        fi
    done
    echo /etc
}

make_input() { # KIND SIZE_MIB: creates KIND-MIB.raw unless it exists
    local kind=$1 mib=$2
    [ -f "$kind-$mib.raw" ] && return
    case $kind in
    rand) head -c "${mib}M" /dev/urandom > "rand-$mib.raw" ;;
    ext4) mke2fs -q -F -t ext4 -b 4096 -d "$(files_for "$mib")" "ext4-$mib.raw" "${mib}M" >/dev/null ;;
    dup50)
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
        rm -f blocks.bin ;;
    esac
}

# Inputs made for one size are removed after it (KEEP_INPUTS=1 keeps
# them), so a 4 GiB run fits in memory on tmpfs.
drop_input() { [ -n "${KEEP_INPUTS:-}" ] || rm -f "$1"; }

row() { # LABEL PREP -- A... -- B...
    local label=$1; shift
    printf '| %s ' "$label"
    "$ab" "$runs" "$@"
}

echo "| job | qemu-img | qcow2 | qcow2 / qemu-img | noise |"
echo "|---|---|---|---|---|"
for mib in "$small" "$large"; do
    make_input rand "$mib"
    # What the kernel alone needs to take MIB MiB into one new file
    # through the page cache. On tmpfs, where every write is a copy the
    # file system serialises per file, no converter can be faster; on a
    # disk, direct I/O can.
    row "*reference*: dd of $mib MiB of zeros into one new file, vs qemu-img raw → qcow2 64k" "rm -f q.qcow2 floor.bin" -- \
        qemu-img convert -t writeback -f raw -O qcow2 "rand-$mib.raw" q.qcow2 -- \
        dd if=/dev/zero of=floor.bin bs=2M count=$((mib / 2)) conv=fsync status=none
    rm -f floor.bin
    for cs in 64k 4k; do
        row "raw → qcow2, $cs clusters, $mib MiB random" "rm -f q.qcow2 o.qcow2" -- \
            qemu-img convert -t writeback -f raw -O qcow2 -o cluster_size=$cs "rand-$mib.raw" q.qcow2 -- \
            "$qcow2" convert -f raw -O qcow2 -o cluster_size=$cs "rand-$mib.raw" o.qcow2
        row "raw → qcow2 dedup=on vs qemu-img plain, $cs, $mib MiB random" "rm -f q.qcow2 o.qcow2" -- \
            qemu-img convert -t writeback -f raw -O qcow2 -o cluster_size=$cs "rand-$mib.raw" q.qcow2 -- \
            "$qcow2" convert -f raw -O qcow2 -o cluster_size=$cs,dedup=on "rand-$mib.raw" o.qcow2
    done
    rm -f q.qcow2 o.qcow2
    make_input ext4 "$mib"
    row "raw → qcow2 dedup=on vs qemu-img plain, 4k, $mib MiB ext4 of real files" "rm -f q.qcow2 o.qcow2" -- \
        qemu-img convert -t writeback -f raw -O qcow2 -o cluster_size=4k "ext4-$mib.raw" q.qcow2 -- \
        "$qcow2" convert -f raw -O qcow2 -o cluster_size=4k,dedup=on "ext4-$mib.raw" o.qcow2
    rm -f q.qcow2 o.qcow2
    drop_input "ext4-$mib.raw"
    make_input dup50 "$mib"
    row "raw → qcow2 dedup=on vs qemu-img plain, 64k, $mib MiB 50 % duplicate" "rm -f q.qcow2 o.qcow2" -- \
        qemu-img convert -t writeback -f raw -O qcow2 "dup50-$mib.raw" q.qcow2 -- \
        "$qcow2" convert -f raw -O qcow2 -o dedup=on "dup50-$mib.raw" o.qcow2
    rm -f q.qcow2 o.qcow2
    drop_input "dup50-$mib.raw"
    qemu-img convert -f raw -O qcow2 -o cluster_size=4k "rand-$mib.raw" src.qcow2
    drop_input "rand-$mib.raw"
    row "qcow2 (4k clusters) → raw, $mib MiB" "rm -f q.raw o.raw" -- \
        qemu-img convert -t writeback -f qcow2 -O raw src.qcow2 q.raw -- \
        "$qcow2" convert -f qcow2 -O raw src.qcow2 o.raw
    rm -f q.raw o.raw
    row "check (4k clusters), $mib MiB" "true" -- \
        qemu-img check src.qcow2 -- "$qcow2" check src.qcow2
    rm -f src.qcow2
done
if [ -n "$into" ]; then
    exec >&3
    sleep 0.2 # let tee drain
    python3 - "$into" "$SECTION" "$table" <<'PY'
import sys
path, name, table = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip()
text = open(path).read()
start, end = f"<!-- vs_qemu {name} -->", f"<!-- /vs_qemu {name} -->"
a, b = text.index(start) + len(start), text.index(end)
open(path, "w").write(text[:a] + "\n" + table + "\n" + text[b:])
PY
    echo "wrote the table into $into ($SECTION)" >&2
fi
