# Evacuate: a volume of EVAC_MB moved onto a new disk by `remapctl evacuate`, next to a plain
# sequential copy of the same size between the same kinds of disks (GNU dd, O_DIRECT, 4 MiB
# requests: an evacuation's window), with no foreground load; then moved back while a
# foreground reader (fio 4 KiB random reads, QD1) runs, its latency next to the same reader on
# the idle volume. Parameters: EVAC_MB, FG_S.
#
# The disks are null_blk without memory (the fastest there are, so every cost of remap's copy
# shows); the spares are memory-backed (their metadata must persist).

emit_guest
nb_create 0 $((EVAC_MB + 2)) 0
nb_create 1 $((EVAC_MB + 2)) 0
nb_create 2 64 1
nb_create 3 64 1
main=/dev/nullb0
new=/dev/nullb1
agent_start || exit 1
remapctl --json create $VOL --main $main --spare /dev/nullb2 --spare /dev/nullb3 >/tmp/create.json ||
    { echo "create failed: $(cat /tmp/create.json)" >&2; exit 1; }
bytes=$(status_num size_bytes)

# wait_done: polls until the evacuation ended; prints the microseconds it took from $1.
wait_done() {
    local t0=$1 st n=0
    while :; do
        st=$(remapctl --json evacuate $VOL --status 2>&1)
        case "$(json_str "$st" state)" in
        done | aborted) break ;;
        esac
        n=$((n + 1))
        if [ $n -gt 6000 ]; then
            progress "evacuation not done after 300 s: $st; $(tail -5 "$LOG" | tr '\n' ' ')" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo $(($(now_us) - t0))
}

# fio_reader SECONDS OUT: 4 KiB random reads on the volume at QD1; writes fio's JSON to OUT.
fio_reader() {
    fio --name=fg --filename=/dev/mapper/$VOL --rw=randread --bs=4k --direct=1 --ioengine=psync \
        --time_based --runtime="$1" --output-format=json >"$2" 2>/dev/null
}
lat() { # lat FIO_JSON: {"iops":..,"p50_us":..,"p99_us":..}
    awk '
        /"read" :/ { inread = 1 }
        inread && /"iops" :/ && !iops { gsub(/[^0-9.]/, "", $3); iops = $3 }
        inread && /"50.000000" :/ && !p50 { gsub(/[^0-9]/, "", $3); p50 = $3 }
        inread && /"99.000000" :/ && !p99 { gsub(/[^0-9]/, "", $3); p99 = $3 }
        END { printf "{\"iops\":%s,\"p50_us\":%.1f,\"p99_us\":%.1f}", iops + 0, p50 / 1000, p99 / 1000 }' "$1"
}

# The plain copy, twice (the second is the one kept: caches and page tables are warm).
for i in 1 2; do
    t0=$(now_us)
    dd if=$main of=$new bs=4M count=$((bytes / 4194304)) iflag=direct oflag=direct status=none
    dd_us=$(($(now_us) - t0))
done
dd if=/dev/zero of=$new bs=1M count=4 oflag=direct status=none
progress "plain copy of $((bytes >> 20)) MiB: $((dd_us / 1000)) ms"

fio_reader "$FG_S" /tmp/idle.json
idle=$(lat /tmp/idle.json)
progress "reader on the idle volume: $idle"

t0=$(now_us)
remapctl evacuate $VOL --to $new --background >/dev/null || { echo "evacuate failed" >&2; exit 1; }
evac_us=$(wait_done "$t0")
progress "evacuation: $((evac_us / 1000)) ms"

# Back onto the first disk with the reader running the whole time.
dd if=/dev/zero of=$main bs=1M count=4 oflag=direct status=none
fio_reader 3600 /tmp/during.json &
fpid=$!
sleep 1
t0=$(now_us)
remapctl evacuate $VOL --to $main --background >/dev/null || { echo "evacuate back failed" >&2; exit 1; }
back_us=$(wait_done "$t0")
kill -INT $fpid
wait $fpid
during=$(lat /tmp/during.json)
progress "evacuation with a reader: $((back_us / 1000)) ms; reader: $during"
emit evacuate "{\"bytes\":$bytes,\"dd_us\":$dd_us,\"evac_us\":$evac_us,\"loaded_us\":$back_us,\"idle\":$idle,\"during\":$during}"
agent_stop
