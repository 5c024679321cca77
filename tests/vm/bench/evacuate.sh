# Evacuate: a volume of EVAC_MB moved onto a new disk by `remapctl evacuate`, next to a plain
# sequential copy of the same size between the same kinds of disks (GNU dd, O_DIRECT, 4 MiB
# requests), with no foreground load; and another moved while a foreground reader (fio 4 KiB
# random reads, QD1) runs, its latency next to the same reader on the idle volume. Parameters: EVAC_MB, FG_S, FG_IOPS.
#
# The disks are memory-backed null_blk (a copy moves real data, as between two fast disks;
# without memory a null_blk read returns whatever its buffer held, which is no disk at all).

emit_guest
# The agent's own "evacuation started" and "done" lines time it (a remapctl call under TCG
# costs a tenth of a second: polling would be part of what is measured).
export REMAP_LOG=info,remap_user::evacuate=debug
nb_create 0 $((EVAC_MB + 2)) 1
nb_create 1 $((EVAC_MB + 2)) 1
nb_create 2 32 1
nb_create 3 32 1
nb_create 4 $((EVAC_MB + 2)) 1
nb_create 5 $((EVAC_MB + 2)) 1
nb_create 6 32 1
nb_create 7 32 1
agent_start || exit 1
# Two volumes, each evacuated once: `vol` with a foreground reader, `quiet` without.
remapctl --json create $VOL --main /dev/nullb0 --spare /dev/nullb2 --spare /dev/nullb3 >/tmp/create.json ||
    { echo "create failed: $(cat /tmp/create.json)" >&2; exit 1; }
remapctl --json create quiet --main /dev/nullb4 --spare /dev/nullb6 --spare /dev/nullb7 >/tmp/create2.json ||
    { echo "create failed: $(cat /tmp/create2.json)" >&2; exit 1; }
bytes=$(status_num size_bytes)

# wait_done VOLUME T0: polls until the evacuation ended; prints the microseconds since T0.
wait_done() {
    local t0=$2 st last=$2
    while :; do
        st=$(remapctl --json evacuate "$1" --status 2>&1)
        case "$(json_str "$st" state)" in
        done | aborted) break ;;
        esac
        if [ $(($(now_us) - last)) -gt 10000000 ]; then
            last=$(now_us)
            progress "evacuating $1: $st" >&2
        fi
        if [ $(($(now_us) - t0)) -gt 300000000 ]; then
            progress "evacuation of $1 not done after 300 s: $st; $(tail -5 "$LOG" | tr '\n' ' ')" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo $(($(now_us) - t0))
}

# log_us VOLUME: microseconds from the agent's "evacuation started" line for VOLUME to its
# "evacuation done" line.
log_us() {
    grep -E "evacuation (started|done).* volume=\"?$1\"? " "$LOG" | awk '
        { split($1, t, "T"); split(t[2], h, ":"); s[NR] = h[1] * 3600 + h[2] * 60 + h[3] }
        END { printf "%d", (s[2] - s[1]) * 1000000 }'
}

# fio_reader SECONDS OUT: 4 KiB random reads on `vol` at QD1, paced (FG_IOPS a second: a
# foreground load that leaves the guest's CPUs room); fio's JSON to OUT.
fio_reader() {
    fio --name=fg --filename=/dev/mapper/$VOL --rw=randread --bs=4k --direct=1 --ioengine=psync \
        --rate_iops="$FG_IOPS" --time_based --runtime="$1" --output-format=json $FIO_EXTRA >"$2" 2>/dev/null
}
# lat_between LOG FROM_MS TO_MS: {"iops":..,"p50_us":..,"p99_us":..} of the reads in fio's
# latency log LOG (unix epoch milliseconds, nanoseconds) that completed between FROM and TO.
lat_between() {
    awk -F', *' -v a="$2" -v b="$3" '$1 % 86400000 >= a && $1 % 86400000 <= b { print $2 }' "$1" | sort -n | awk -v ms=$(($3 - $2)) '
        { v[NR] = $1 }
        END {
            if (NR == 0) { printf "{\"iops\":0,\"p50_us\":0,\"p99_us\":0}"; exit }
            printf "{\"iops\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f}", NR * 1000 / ms,
                v[int((NR - 1) * 0.5) + 1] / 1000, v[int((NR - 1) * 0.99) + 1] / 1000
        }'
}
# log_ms VOLUME started|done: the agent's line for VOLUME's evacuation, in milliseconds since
# midnight (UTC, as the log's stamps and fio's epoch times both are).
log_ms() {
    grep -E "evacuation $2.* volume=\"?$1\"? " "$LOG" | head -1 | awk '
        { split($1, t, "T"); split(t[2], h, ":"); printf "%d", (h[1] * 3600 + h[2] * 60 + h[3]) * 1000 }'
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
    dd if=/dev/nullb0 of=/dev/nullb1 bs=4M count=$((bytes / 4194304)) iflag=direct oflag=direct status=none
    dd_us=$(($(now_us) - t0))
done
dd if=/dev/zero of=/dev/nullb1 bs=1M count=4 oflag=direct status=none
# The evacuations' targets written once before, as dd's was: null_blk allocates its memory on
# a sector's first write, a cost no disk has (it made the evacuation look 3 times slower).
dd if=/dev/zero of=/dev/nullb5 bs=1M count=$((EVAC_MB + 2)) oflag=direct status=none
progress "plain copy of $((bytes >> 20)) MiB: $((dd_us / 1000)) ms"

# With FG_S > 0, `vol` moves while a foreground reader runs (see the header).
loaded_us=0 idle='{}' during='{}'
if [ "$FG_S" -gt 0 ]; then
    fio_reader "$FG_S" /tmp/idle.json
    idle=$(lat /tmp/idle.json)
    progress "reader on the idle volume: $idle"
    # The reader logs each read's latency with its time; the ones that completed between the
    # agent's "started" and "done" lines are the reader during the evacuation.
    FIO_EXTRA="--write_lat_log=/tmp/fg --log_unix_epoch=1" fio_reader 3600 /tmp/during.json &
    fpid=$!
    sleep 1
    t0=$(now_us)
    out=$(timeout 120 remapctl evacuate $VOL --to /dev/nullb1 --background 2>&1) ||
        { progress "evacuate failed: $out"; exit 1; }
    wait_done $VOL "$t0" >/dev/null
    loaded_us=$(log_us $VOL)
    # $fpid is the subshell running fio_reader: SIGINT goes to fio itself (its child), which
    # then stops and writes its report; the subshell would only wait for it.
    kill -INT $(cat /proc/$fpid/task/$fpid/children)
    wait $fpid
    during=$(lat_between /tmp/fg_lat.1.log "$(log_ms $VOL started)" "$(log_ms $VOL done)")
    progress "evacuation with a reader: $((loaded_us / 1000)) ms; reader: $during"
fi

t0=$(now_us)
remapctl evacuate quiet --to /dev/nullb5 --background >/dev/null || { echo "evacuate failed" >&2; exit 1; }
wall_us=$(wait_done quiet "$t0")
evac_us=$(log_us quiet)
progress "evacuation: $((evac_us / 1000)) ms by the agent's log, $((wall_us / 1000)) ms by remapctl"
emit evacuate "{\"bytes\":$bytes,\"fg_iops\":$FG_IOPS,\"dd_us\":$dd_us,\"evac_us\":$evac_us,\"wall_us\":$wall_us,\"loaded_us\":$loaded_us,\"idle\":$idle,\"during\":$during}"
grep -E "window moved|evacuation" "$LOG" | sed 's/^/bench: log: /' | cut -c1-300
agent_stop
emit done "{\"section\":\"evacuate\"}"
