# Volume overhead: fio on the raw null_blk disk and on the volume over it, side by side, with 0
# and more background remaps; and what the agent's eBPF programs cost per run in the guest.
# Parameters: OVERHEAD_SIZES, RUNS, FIO_S, ROUNDS.
#
# The main disk is a null_blk without memory (8 GiB): the fastest disk there is, so whatever the
# layers above cost shows in full. The spares are hybrids (see lib.sh).

emit_guest
MAIN_MB=8192
CHUNKS=$((MAIN_MB * 256))
STRIDE=$((CHUNKS / RUNS))
main=/dev/nullb0
nb_create 0 $MAIN_MB 0
sp0=$(hybrid_spare bsp0 1 2 $MAIN_MB)
sp1=$(hybrid_spare bsp1 3 4 $MAIN_MB)

PATTERNS="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 read-1m-qd1 write-1m-qd1"
# fio_pattern DEV PATTERN: the terse line of one run.
fio_pattern() {
    local rw bs qd
    IFS=- read -r rw bs qd <<<"$2"
    fio_terse --name="$2" --filename="$1" --ioengine=libaio --rw="$rw" --bs="$bs" \
        --iodepth="${qd#qd}" --time_based --runtime="$FIO_S" --size=$((MAIN_MB))M | head -1
}
# bpf_snap: "NAME:RUN_TIME_NS:RUN_CNT ..." of the tracepoint programs loaded.
bpf_snap() {
    bpftool prog show 2>/dev/null | awk '
        /^[0-9]+: tracepoint/ { name = ""; for (i = 1; i <= NF; i++) { if ($i == "name") name = $(i + 1) }
            t = 0; c = 0
            for (i = 1; i <= NF; i++) { if ($i == "run_time_ns") t = $(i + 1); if ($i == "run_cnt") c = $(i + 1) }
            if (name != "") printf "%s:%s:%s ", name, t, c }'
}
run() { # run SIZE TARGET DEV PATTERN ROUND
    local b a line
    b=$(bpf_snap)
    line=$(fio_pattern "$3" "$4")
    a=$(bpf_snap)
    emit fio "{\"remaps\":$1,\"target\":\"$2\",\"pattern\":\"$4\",\"round\":$5,\"terse\":$(jstr "$line"),\"bpf_before\":$(jstr "$b"),\"bpf_after\":$(jstr "$a")}"
}

echo 1 >/proc/sys/kernel/bpf_stats_enabled
progress "overhead: raw disk, no agent"
for ((round = 0; round < ROUNDS; round++)); do
    for p in $PATTERNS; do run 0 raw-no-agent $main "$p" $round; done
done
# The fallback detector (every completion) on the same disk, for a guest-side ratio to the
# agent's pending-write watcher, which also runs on every completion.
remapd watch --device $main --detector complete --pin-dir /sys/fs/bpf/remap-watch >/dev/null 2>/tmp/watch.log &
watch_pid=$!
wait_for /tmp/watch.log attached 60
for ((round = 0; round < ROUNDS; round++)); do run 0 raw-watch-complete $main randread-4k-qd1 $round; done
kill -TERM $watch_pid
wait $watch_pid 2>/dev/null
agent_start || exit 1
remapctl --json create $VOL --main $main --spare "$sp0" --spare "$sp1" >/tmp/create.json ||
    { echo "create failed: $(cat /tmp/create.json)" >&2; exit 1; }
for size in $OVERHEAD_SIZES; do
    bg_grow "$size"
    progress "overhead: raw and volume at $size remaps"
    for ((round = 0; round < ROUNDS; round++)); do
        for p in $PATTERNS; do
            run "$size" raw $main "$p" $round
            run "$size" volume /dev/mapper/$VOL "$p" $round
        done
    done
done
agent_stop
emit done "{\"section\":\"overhead\"}"
