#!/bin/sh
# Durability at every flush point. The main and both spares are slices of one dm-log-writes
# device, which records every write, flush and FUA of the volume and of remapd, in order, on a
# host disk. Over it: a volume with six bad 4 KiB blocks (null_blk bad blocks under the log),
# filled by a writer, then more than 1,000 remaps made one by one while the writer keeps
# writing random blocks and flushing every 4 writes (its flushes take turns with the remaps). After the boot, `flushcheck check` on the
# host replays the log to every flush point (and every FUA write), and at each one reads the
# metadata as assembly would and checks: acknowledged writes present, no extent owned twice,
# bad blocks pending and readable ones not, no wrong data; each lone metadata write of an epoch
# is checked on top of the flush point before it too (a crash may keep it without the rest).
# The first run's disk has 4 KiB sectors, so the journal is written in 4 KiB blocks and its
# 512-block ring passes 3/4 twice: checkpoints (written in slices between remaps, or whole at
# 7/8) fall between the flush points too. The second run's disk has 512-byte sectors (a
# 512-byte journal).
# A second, shorter run injects a missing flush (REMAP_FAULT=skip-copy-flush: a chunk's copy
# is not flushed before the commit that points at it): the checker must find it.
#vm: cases remaps-done fault-run-done flush-points missing-flush-caught
#vm: disk log 512M
#vm: disk faultlog 128M
#vm: needs remapd remapctl flushcheck
#vm: timeout 900
#vm: host-check flushcheck check @log --case flush-points --min-remaps 1000 --min-checkpoints 2
#vm: host-check flushcheck check @faultlog --case missing-flush-caught --expect-violation
. /vm/lib.sh

modprobe dm-log-writes 2>/dev/null
# Kernel stacks of blocked tasks reach the console.
echo 8 >/proc/sys/kernel/printk
MAIN=65536  # 32 MiB
SPARE=49152 # 24 MiB (an 8 MiB metadata area, 16 MiB of extents)
BAD="2048+8 10240+8 20000+8 33000+8 50000+8 60000+8"
SKIP="" NULLB_BAD=""
for b in $BAD; do
    SKIP="$SKIP --skip $b"
    NULLB_BAD="$NULLB_BAD --bad ${b%+*}-$((${b%+*} + ${b#*+} - 1))"
done

# stack PREFIX DATA LOG: PREFIXlw (log-writes of DATA onto LOG) and the main and spares over it.
# DATA is a null_blk disk whose bad blocks fail reads: the main stays one linear target, since a
# flush through the volume reaches the logged device once per target on its way down.
stack() {
    p=$1
    dmsetup create "${p}lw" --table "0 $((MAIN + 2 * SPARE)) log-writes $2 $3" || return 1
    lw=/dev/mapper/${p}lw
    dmsetup create "${p}main" --table "0 $MAIN linear $lw 0" || return 1
    dmsetup create "${p}s1" --table "0 $SPARE linear $lw $MAIN" || return 1
    dmsetup create "${p}s2" --table "0 $SPARE linear $lw $((MAIN + SPARE))" || return 1
    # The log's first entry says what it is a log of (a mark is one word).
    dmsetup message "${p}lw" 0 mark \
        "remap-layout;main=0+$MAIN;spare=$MAIN+$SPARE;spare=$((MAIN + SPARE))+$SPARE;bad=$(echo $BAD | tr ' ' ',')"
}

# remove_dev NAME: dmsetup remove, watched. Once on 6.1 a removal in this teardown stayed blocked
# in the kernel (D state: no signal ends it, so `timeout` waited with it until the boot timed
# out). A removal still running after 60 s dumps the blocked tasks' stacks on the console and is
# left behind; the log was closed by a mark before the teardown, so the host checks still read
# every entry of the run.
remove_dev() {
    dmsetup remove "$1" &
    rp=$! i=0
    while kill -0 $rp 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 600 ]; then
            echo w >/proc/sysrq-trigger
            info "teardown: dmsetup remove $1 blocked in the kernel for 60 s (stacks on the console)"
            return 1
        fi
        sleep 0.1
    done
    wait $rp
}

# unstack PREFIX VOLUME: a mark that writes the log's superblock (so it counts every entry
# before it), then the volume's devices and the stack.
unstack() {
    dmsetup message "${1}lw" 0 mark end-of-run
    remove_dev "$2" || return 1
    for d in $(dmsetup ls | awk '{ print $1 }' | grep "^$2-remap-r"); do remove_dev "$d" || return 1; done
    for d in main s1 s2 lw; do
        remove_dev "$1$d" || return 1
    done
}

# Each start logs to its own file: waiting on a reused one could find the last start's "ready".
starts=0
start_agent() {
    starts=$((starts + 1))
    log=/tmp/remapd.$starts.log
    env "$@" remapd >>/tmp/remapd.out 2>"$log" &
    agent=$!
    wait_for "$log" "remapd ready" 90
}
stop_agent() {
    kill -TERM $agent
    wait $agent 2>/dev/null
}

data=$(nullb create --size $(((MAIN + 2 * SPARE) / 2048)) --bs 4096 $NULLB_BAD)
stack "" "$data" "$(vmdisk log)" || { fail remaps-done "setup: the log-writes stack"; exit 1; }
start_agent || { fail remaps-done "remapd not ready: $(tail -5 "$log")"; exit 1; }
if ! out=$(remapctl create --in-place vol0 --main /dev/mapper/main --spare /dev/mapper/s1 --spare /dev/mapper/s2 \
    --chunk-size 16KiB --region-size 1MiB 2>&1); then
    fail remaps-done "create: $out"
    exit 1
fi
dmsetup message lw 0 mark created
flushcheck write /dev/mapper/vol0 --fill $SKIP || { fail remaps-done "fill failed"; exit 1; }
rm -f /tmp/stop
# The writer's flushes and each remap take turns (flushcheck locked: two flushes in flight at
# once can reach the log out of order); its writes race the remaps.
flushcheck write /dev/mapper/vol0 --sync-every 4 --pause-ms 30 --until /tmp/stop --max-writes 30000 \
    --lock /tmp/flush.lock $SKIP >/tmp/writer.out 2>&1 &
writer=$!
# Chunks 0 to 1000, then the bad chunks past them: one remap, one commit each.
t0=$(date +%s)
failed=0 c=0
while [ $c -le 1000 ]; do
    flushcheck locked /tmp/flush.lock remapctl remap add vol0 $((c * 32)) >/dev/null 2>>/tmp/remap-errors ||
        failed=$((failed + 1))
    c=$((c + 1))
done
for c in 1031 1562 1875; do
    flushcheck locked /tmp/flush.lock remapctl remap add vol0 $((c * 32)) >/dev/null 2>>/tmp/remap-errors ||
        failed=$((failed + 1))
done
t1=$(date +%s)
touch /tmp/stop
wait $writer
wstatus=$?
st=$(remapctl status vol0 --json)
remaps=$(json_num "$st" remaps)
pending=$(json_num "$st" pending)
unit=$(json_num "$st" journal_unit)
sliced=$(grep -c "checkpoint written in slices" "$log")
if [ "$failed" = 0 ] && [ "$wstatus" = 0 ] && [ "${remaps:-0}" -ge 1000 ] && [ "$unit" = 4096 ] && [ "$sliced" -ge 1 ]; then
    pass remaps-done "$remaps remaps in $((t1 - t0)) s with a flushing writer ($(cat /tmp/writer.out)); pending blocks ${pending:-?}; journal in $unit B blocks, $sliced checkpoints written in slices"
else
    fail remaps-done "remaps ${remaps:-?}, $failed failed ($(head -c 300 /tmp/remap-errors)), writer status $wstatus: $(tail -2 /tmp/writer.out); journal unit ${unit:-?} (want 4096), checkpoints in slices $sliced (want 1 or more)"
fi
stop_agent
unstack "" vol0 || info "teardown left: $(dmsetup ls | tr '\n' ' ')"
if dmesg | grep -q "log-writes.*Ran out of space"; then
    fail remaps-done "the log device is too small: $(dmesg | grep log-writes | tail -1)"
fi

# The same with the copy's flush left out.
data2=$(nullb create --size $(((MAIN + 2 * SPARE) / 2048)) $NULLB_BAD)
stack f "$data2" "$(vmdisk faultlog)" || { fail fault-run-done "setup: the second stack"; exit 1; }
start_agent REMAP_FAULT=skip-copy-flush || { fail fault-run-done "remapd not ready: $(tail -5 "$log")"; exit 1; }
if ! out=$(remapctl create --in-place vol1 --main /dev/mapper/fmain --spare /dev/mapper/fs1 --spare /dev/mapper/fs2 \
    --chunk-size 16KiB --region-size 1MiB 2>&1); then
    fail fault-run-done "create: $out"
    exit 1
fi
dmsetup message flw 0 mark created
flushcheck write /dev/mapper/vol1 --fill $SKIP || { fail fault-run-done "fill failed"; exit 1; }
n=0
for c in $(seq 1 2 61); do
    remapctl remap add vol1 $((c * 32)) >/dev/null 2>&1 && n=$((n + 1))
done
pass fault-run-done "$n remaps with REMAP_FAULT=skip-copy-flush"
stop_agent
unstack f vol1 || info "teardown left: $(dmsetup ls | tr '\n' ' ')"
sync
