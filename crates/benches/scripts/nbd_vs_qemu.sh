#!/usr/bin/env bash
# fio through NBD against `qcow2 serve` and `qemu-nbd` serving the same kind
# of image, interleaved, with a noise row (qemu-nbd against itself).
#
#   crates/benches/scripts/nbd_vs_qemu.sh DIR RUNS > table.md
#
# Jobs: 4 KiB random reads and writes at queue depth 1 and 32, 1 MiB
# sequential reads and writes, each on one connection and on four
# (multi-conn: four fio jobs, one connection each, a quarter of the depth
# each). Images: qemu-nbd always serves a plain qcow2 (64 KiB clusters);
# ours serves the same plain image, then dedup images with 4 KiB and with
# 64 KiB clusters. Every image starts as a copy of one template holding
# the same 1 GiB of unique data, so reads read data. Prints Markdown with
# the median IOPS (or MB/s) of each and the ratio qcow2 / qemu-nbd.
#
# Then "write then read in one session": each server starts on an empty
# image, fio writes 512 MiB of unique data through it, and the same
# server then reads it back (1 MiB sequential reads, queue depth 8), as a
# guest does; the read figure is reported. ONLY_WRITE_THEN_READ=1 runs
# this part alone.
set -euo pipefail
dir=$1; runs=$2
here=$(cd "$(dirname "$0")" && pwd)
qcow2=${QCOW2:-$here/../../../target/release/qcow2}
cd "$dir"
dir=$(pwd) # qemu-nbd wants an absolute socket path
size=1G

start_server() { # KIND IMAGE SOCKET
    case $1 in
        qemu) qemu-nbd -f qcow2 -k "$3" -t -e 4 --cache=writeback "$2" & ;;
        ours) "$qcow2" serve -k "$3" -t -e 4 "$2" & ;;
    esac
    server=$!
    for _ in $(seq 200); do [ -S "$3" ] && return; sleep 0.05; done
    echo "server did not start" >&2; exit 1
}
stop_server() { kill -TERM "$server"; wait "$server" 2>/dev/null || true; rm -f "$1"; }

# One template per kind, made once from the same random data.
make_templates() {
    head -c $size /dev/urandom > "$dir/data.raw"
    qemu-img convert -f raw -O qcow2 "$dir/data.raw" "$dir/tpl-plain.qcow2"
    "$qcow2" convert -q -f raw -O qcow2 -o dedup=on,cluster_size=4k "$dir/data.raw" "$dir/tpl-dedup4k.qcow2"
    "$qcow2" convert -q -f raw -O qcow2 -o dedup=on,cluster_size=64k "$dir/data.raw" "$dir/tpl-dedup64k.qcow2"
    rm -f "$dir/data.raw"
}

fresh_image() { # KIND PATH
    rm -f "$2"
    cp --sparse=always "$dir/tpl-$1.qcow2" "$2"
}

fio_job() { # SOCKET RW BS DEPTH CONNS -> one number (IOPS, or MB/s for 1M)
    local out
    out=$(fio --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$1" \
        --rw="$2" --bs="$3" --iodepth="$4" --numjobs="$5" --group_reporting \
        --size=$size --time_based --runtime=5 \
        --refill_buffers --randrepeat=0 --output-format=json 2>/dev/null)
    python3 -c '
import json, sys
text = sys.stdin.read()  # fio prints a line before its JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] else j["read"]
bs = sys.argv[1]
print(round(side["bw_bytes"] / 1e6, 1) if bs == "1M" else round(side["iops"]))
' "$3" <<<"$out"
}

median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

measure() { # SERVER_KIND IMAGE_KIND RW BS DEPTH CONNS
    fresh_image "$2" "$dir/img-$1.qcow2"
    start_server "$1" "$dir/img-$1.qcow2" "$dir/s-$1"
    fio_job "$dir/s-$1" "$3" "$4" "$5" "$6"
    stop_server "$dir/s-$1"
}

# WRITE_THEN_READ SERVER_KIND IMAGE_KIND -> MB/s of the read phase
write_then_read() {
    local img="$dir/wr-$1.qcow2" sock="$dir/w-$1"
    rm -f "$img"
    case $2 in
        plain) qemu-img create -q -f qcow2 "$img" $size ;;
        dedup4k) "$qcow2" create -q -o dedup=on,cluster_size=4k "$img" $size ;;
        dedup64k) "$qcow2" create -q -o dedup=on,cluster_size=64k "$img" $size ;;
    esac
    start_server "$1" "$img" "$sock"
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=write --bs=1M \
        --iodepth=8 --size=512M --refill_buffers --randrepeat=0 >/dev/null 2>&1
    fio --name=r --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=read --bs=1M \
        --iodepth=8 --size=512M --time_based --runtime=5 --output-format=json 2>/dev/null |
        python3 -c '
import json, sys
text = sys.stdin.read()
print(round(json.loads(text[text.index("{"):])["jobs"][0]["read"]["bw_bytes"] / 1e6, 1))'
    stop_server "$sock"
    rm -f "$img"
}

if [ -z "${ONLY_WRITE_THEN_READ:-}" ]; then
make_templates

echo "| job | qemu-nbd (plain) | qcow2 serve | qcow2 / qemu-nbd | noise (qemu-nbd vs itself) |"
echo "|---|---|---|---|---|"
for ours_kind in plain dedup4k dedup64k; do
    for job in "randread 4k 1 1" "randread 4k 32 1" "randread 4k 8 4" \
        "randwrite 4k 1 1" "randwrite 4k 32 1" "randwrite 4k 8 4" \
        "read 1M 8 1" "read 1M 2 4" "write 1M 8 1" "write 1M 2 4"; do
        set -- $job
        q=(); o=()
        for ((i = 0; i < runs; i++)); do
            q+=("$(measure qemu plain "$1" "$2" "$3" "$4")")
            o+=("$(measure ours "$ours_kind" "$1" "$2" "$3" "$4")")
        done
        mq=$(printf '%s\n' "${q[@]}" | median)
        mo=$(printf '%s\n' "${o[@]}" | median)
        odd=$(printf '%s\n' "${q[@]}" | awk 'NR%2==1' | median)
        even=$(printf '%s\n' "${q[@]}" | awk 'NR%2==0' | median)
        unit=$([ "$2" = 1M ] && echo "MB/s" || echo "IOPS")
        conns=$([ "$4" = 1 ] && echo "1 conn" || echo "$4 conns x qd$3")
        awk -v l="$1 $2 qd$(($3 * $4)) ($conns), ours $ours_kind" -v a="$mq" -v b="$mo" -v o="$odd" -v e="$even" -v u="$unit" \
            'BEGIN {printf "| %s | %s %s | %s %s | %.2f | %.2f |\n", l, a, u, b, u, b / a, (e > 0 ? o / e : 0)}'
    done
done
fi
echo
echo "| write then read in one session (read 1M qd8) | qemu-nbd (plain) | qcow2 serve | qcow2 / qemu-nbd | noise (qemu-nbd vs itself) |"
echo "|---|---|---|---|---|"
for ours_kind in plain dedup4k dedup64k; do
    q=(); o=()
    for ((i = 0; i < runs; i++)); do
        q+=("$(write_then_read qemu plain)")
        o+=("$(write_then_read ours "$ours_kind")")
    done
    mq=$(printf '%s\n' "${q[@]}" | median)
    mo=$(printf '%s\n' "${o[@]}" | median)
    odd=$(printf '%s\n' "${q[@]}" | awk 'NR%2==1' | median)
    even=$(printf '%s\n' "${q[@]}" | awk 'NR%2==0' | median)
    awk -v l="ours $ours_kind" -v a="$mq" -v b="$mo" -v o="$odd" -v e="$even" \
        'BEGIN {printf "| %s | %s MB/s | %s MB/s | %.2f | %.2f |\n", l, a, b, b / a, (e > 0 ? o / e : 0)}'
done
rm -f img-*.qcow2 tpl-*.qcow2
