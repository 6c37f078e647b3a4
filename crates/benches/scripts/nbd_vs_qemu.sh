#!/usr/bin/env bash
# fio through NBD against `qcow2 serve` and `qemu-nbd` serving the same kind
# of image, interleaved, with a noise row (qemu-nbd against itself).
#
#   crates/benches/scripts/nbd_vs_qemu.sh DIR RUNS > table.md
#
# Jobs: 4 KiB random reads and writes at queue depth 1 and 32, 1 MiB
# sequential writes; on a plain image (both servers) and a dedup image
# (ours, unique data, against qemu-nbd's plain). Prints Markdown with the
# median IOPS (or MB/s) of each and the ratio qcow2 / qemu-nbd.
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

fresh_image() { # KIND PATH
    rm -f "$2"
    case $1 in
        plain) qemu-img create -q -f qcow2 "$2" $size ;;
        dedup) "$qcow2" create -q -o dedup=on "$2" $size ;;
    esac
    # Reads need data: fill it once (unique content).
    qemu-io -f qcow2 -c "write -P 0x33 0 $size" "$2" >/dev/null 2>&1 || true
}

fio_job() { # SOCKET RW BS DEPTH -> one number (IOPS, or MB/s for 1M)
    local out
    out=$(fio --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$1" \
        --rw="$2" --bs="$3" --iodepth="$4" --size=$size --time_based --runtime=5 \
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

measure() { # SERVER_KIND IMAGE_KIND RW BS DEPTH
    fresh_image "$2" "$dir/img-$1.qcow2"
    start_server "$1" "$dir/img-$1.qcow2" "$dir/s-$1"
    fio_job "$dir/s-$1" "$3" "$4" "$5"
    stop_server "$dir/s-$1"
}

echo "| job | qemu-nbd (plain) | qcow2 serve | qcow2 / qemu-nbd | noise (qemu-nbd vs itself) |"
echo "|---|---|---|---|---|"
for ours_kind in plain dedup; do
    for job in "randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "write 1M 8"; do
        set -- $job
        [ "$ours_kind" = dedup ] && [ "$1" = randread ] && continue
        q=(); o=()
        for ((i = 0; i < runs; i++)); do
            q+=("$(measure qemu plain "$1" "$2" "$3")")
            o+=("$(measure ours "$ours_kind" "$1" "$2" "$3")")
        done
        mq=$(printf '%s\n' "${q[@]}" | median)
        mo=$(printf '%s\n' "${o[@]}" | median)
        odd=$(printf '%s\n' "${q[@]}" | awk 'NR%2==1' | median)
        even=$(printf '%s\n' "${q[@]}" | awk 'NR%2==0' | median)
        unit=$([ "$2" = 1M ] && echo "MB/s" || echo "IOPS")
        awk -v l="$1 $2 qd$3, ours $ours_kind" -v a="$mq" -v b="$mo" -v o="$odd" -v e="$even" -v u="$unit" \
            'BEGIN {printf "| %s | %s %s | %s %s | %.2f | %.2f |\n", l, a, u, b, u, b / a, (e > 0 ? o / e : 0)}'
    done
done
rm -f img-*.qcow2
