# Volume overhead: fio on the raw null_blk disk and on the volume over it, side by side, with 0
# and more background remaps; what the agent's eBPF programs cost per run in the guest.
# Parameters: OVERHEAD_SIZES, RUNS, FIO_S, ROUNDS.
#
# The main disk is a null_blk without memory (8 GiB): the fastest disk there is, so whatever the
# layers above cost shows in full. The spares are hybrids (see lib.sh). Each fio run is a pair
# of jobs, raw disk then volume (the order flips every round), so that the two see the same
# moment of a shared, noisy machine; ratios are taken per pair.
emit_guest

MAIN_MB=8192
CHUNKS=$((MAIN_MB * 256))
STRIDE=$((CHUNKS / RUNS))
main=/dev/nullb0
nb_create 0 $MAIN_MB 0
sp0=$(hybrid_spare bsp0 1 2 $MAIN_MB)
sp1=$(hybrid_spare bsp1 3 4 $MAIN_MB)

PATTERNS="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 read-1m-qd1 write-1m-qd1"
# bpf_snap: "NAME:RUN_TIME_NS:RUN_CNT ..." of the tracepoint programs loaded.
bpf_snap() {
    bpftool prog show 2>/dev/null | awk '
        /^[0-9]+: (tracepoint|tracing)/ { name = ""; for (i = 1; i <= NF; i++) { if ($i == "name") name = $(i + 1) }
            t = 0; c = 0
            for (i = 1; i <= NF; i++) { if ($i == "run_time_ns") t = $(i + 1); if ($i == "run_cnt") c = $(i + 1) }
            if (name != "") printf "%s:%s:%s ", name, t, c }'
}
# A plain dm-linear over the whole main disk, made with dmsetup while the agent is stopped: what
# device-mapper alone costs, next to the volume (one dm-linear over the main too, at 0 remaps).
PLAIN=remap-bench-plain
# pair SIZE AGENT PATTERN ROUND: fio on the raw disk and on the volume, one job after the other;
# with the agent off at 0 remaps, on the plain dm-linear too.
pair() {
    local rw bs qd b a out jobs plain=""
    IFS=- read -r rw bs qd <<<"$3"
    # BPF statistics time every program run (two clock reads each), a cost of their own: on
    # in odd rounds only, whose runs give the programs' time, and off in even rounds, whose
    # runs give the IOPS ratios.
    local stats=$(($4 % 2))
    echo $stats >/proc/sys/kernel/bpf_stats_enabled
    if [ "$1" = 0 ] && [ "$2" = off ]; then
        dmsetup create $PLAIN --table "0 $((MAIN_MB * 2048)) linear $main 0" || return 1
        plain="--name=plain --filename=/dev/mapper/$PLAIN"
    fi
    if [ $(($4 % 2)) -eq 0 ]; then
        jobs="--name=raw --filename=$main --name=volume --filename=/dev/mapper/$VOL $plain"
    else
        jobs="$plain --name=volume --filename=/dev/mapper/$VOL --name=raw --filename=$main"
    fi
    b=$(bpf_snap)
    # shellcheck disable=SC2086
    out=$(fio_terse --ioengine=libaio --rw="$rw" --bs="$bs" --iodepth="${qd#qd}" \
        --time_based --runtime="$FIO_S" --size=${MAIN_MB}M --stonewall $jobs | tr '\n' '|')
    a=$(bpf_snap)
    [ -z "$plain" ] || dmsetup remove $PLAIN || return 1
    emit fio "{\"remaps\":$1,\"agent\":\"$2\",\"pattern\":\"$3\",\"round\":$4,\"stats\":$stats,\"terse\":$(jstr "$out"),\"bpf_before\":$(jstr "$b"),\"bpf_after\":$(jstr "$a")}"
}

echo 1 >/proc/sys/kernel/bpf_stats_enabled

# The fallback detector (every completion) alone on the raw disk, for a guest-side ratio to the
# agent's completion watcher (rq_done: pending rewrites, slow I/O) and its issue stamp (rq_issue).
remapd watch --device $main --detector complete --slow-ms 0 --pin-dir /sys/fs/bpf/remap-watch >/dev/null 2>/tmp/watch.log &
watch_pid=$!
wait_for /tmp/watch.log attached 60
for ((round = 0; round < ROUNDS; round++)); do
    b=$(bpf_snap)
    out=$(fio_terse --ioengine=libaio --rw=randread --bs=4k --iodepth=1 --time_based \
        --runtime="$FIO_S" --size=${MAIN_MB}M --name=raw --filename=$main | tr '\n' '|')
    a=$(bpf_snap)
    emit fio "{\"remaps\":0,\"agent\":\"watch-complete\",\"pattern\":\"randread-4k-qd1\",\"round\":$round,\"terse\":$(jstr "$out"),\"bpf_before\":$(jstr "$b"),\"bpf_after\":$(jstr "$a")}"
done
kill -TERM $watch_pid
wait $watch_pid 2>/dev/null

agent_start || exit 1
remapctl --json create --in-place $VOL --main $main --spare "$sp0" --spare "$sp1" >/tmp/create.json ||
    { echo "create failed: $(cat /tmp/create.json)" >&2; exit 1; }
# At 0 remaps the agent is stopped and started again between the two runs of each pattern (the
# volume stays up), so "agent on" and "agent off" are measured a few seconds apart, not
# minutes: the emulated machine drifts by more than the programs cost. The state carries over
# from one pattern to the next, so the order (off then on, on then off) alternates.
progress "raw and volume at 0 remaps, agent off and on"
agent_on=1
for ((round = 0; round < ROUNDS; round++)); do
    for p in $PATTERNS; do
        if [ $agent_on = 1 ]; then
            pair 0 on "$p" $round
            agent_stop
            agent_on=0
            pair 0 off "$p" $round
        else
            pair 0 off "$p" $round
            agent_start || exit 1
            agent_on=1
            # Its start-up work (assembly checks, the first health read) is not the healthy path.
            sleep 2
            pair 0 on "$p" $round
        fi
    done
done
[ $agent_on = 1 ] || agent_start || exit 1
for size in $OVERHEAD_SIZES; do
    [ "$size" -gt 0 ] || continue
    bg_grow "$size"
    progress "raw and volume at $size remaps"
    for ((round = 0; round < ROUNDS; round++)); do
        for p in $PATTERNS; do pair "$size" on "$p" $round; done
    done
done
agent_stop
emit done "{\"section\":\"overhead\"}"
