#!/bin/sh
# While a storm of remaps runs in one region, a reader of another region sees no pause longer
# than its normal latency: a remap suspends only its own region device.
#
# Volume over null_blk, 128 MiB in four 32 MiB regions. The storm: a rate-limited sequential
# reader (fio, 2 MiB reads, one a second, continue_on_error) over 20 MiB of region 0 that
# went bad but for one chunk in 65: every read fails, and the agent remaps its ~500 chunks in
# one batch that suspends region 0 for 10-100 ms: ~10 batches in 10 s.
# The measured reader: fio randread, 4 KiB, O_DIRECT, QD1, for 8 s (after a 1 s ramp left out
# of the numbers) on 96-128 MiB (region 3), with latency
# percentiles and a per-read latency log (epoch timestamps). Its baseline is the very same
# pair of jobs before the bad sectors exist (the storm then reads healthy blocks): same I/O,
# same duration, no remaps. A third reader, of a null_blk outside the volume, runs alongside
# both to tell when the whole VM stood still.
#
# The bounds, and why. Under TCG the longest single read of an 8 s run swings from ~10 ms on
# a quiet host to over 1 s on a loaded one with no remap anywhere (the host deschedules the
# VM or one vCPU), and the agent's CPU work lengthens reads that run alongside a batch.
# A bound on the maximum such as max(5 x baseline p99, baseline max + slack) therefore
# cannot tell a pause from noise (it passes or fails by luck): the maxima and percentiles are
# printed next to the baseline's, and what a leaked suspend would do is asserted instead,
# against the suspend windows themselves (from remapd's log: each ends when its batch's first
# "chunk remapped" line is logged, soon after resume, and lasts suspended_micros; windows of
# 8 ms or more inside the reader's run, whose middle halves are long enough for the reader to
# complete at least 40 reads there at its rate outside the windows; less is inconclusive, not
# a pass. A batch's region tables are loaded before its suspend, so a window holds the copy
# and the journal commit only: 10-100 ms here, or one window of seconds when the storm's
# reads fail faster than the agent reacts and one batch takes the whole bad range):
#   1. the reader keeps completing reads while region 0 is suspended: its completion rate in
#      the middle half of each window (clear of the edges: the suspend ioctl lets in-flight
#      I/O finish, and on 6.12 the pending-write watch is updated between resume and that log
#      line) is at least 25% of its rate outside the windows. A reader behind the suspends
#      completes next to nothing in them (the control measured 1-15%), the other region's
#      reader 50-130% (CPU contention is the rest).
#   2. reads do not wait the suspends out: of the windows of 50 ms or more, fewer than two
#      and fewer than a quarter are overlapped by a read lasting 80% of the window or more
#      while the reader outside the volume kept completing reads (so the VM was running).
#      A leaked suspend does that at nearly every window (the control: 10 of 10 on 6.1);
#      scheduling noise (reads of 40 ms or more happen 0-6 times a run) at most once.
# A control proves the measurement sees a pause: the same storm in region 1 with the reader
# in region 1 must fail bound 1.
#vm: cases setup other-region-no-pause control-same-region
#vm: needs remapd remapctl
#vm: timeout 300
. /vm/lib.sh

VOL=vol0
main=$(nullb create --size 128)
sp1=$(nullb create --size 48)
sp2=$(nullb create --size 48)
other=$(nullb create --size 16) # the unrelated reader's disk, outside any volume

remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail setup "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if ! out=$(remapctl create --in-place $VOL --main "$main" --spare "$sp1" --spare "$sp2" --region-size 32MiB 2>&1); then
    fail setup "create: $out"
    exit 1
fi
dd if=/dev/urandom of=/dev/mapper/$VOL bs=1M count=128 oflag=direct status=none
num() { json_num "$(remapctl status $VOL --json)" "$1"; }

# awk -f /tmp/windows.awk REMAPD_LOG UNRELATED_LAT_LOG READER_LAT_LOG prints (times in ms):
#   WINDOWS (suspends >= 8 ms inside the reader's run) READS_IN_THEM INTERIOR_MS
#   RATE_IN_THEM_AS_%_OF_RATE_OUTSIDE STALLS (reads >= 80% of an overlapped window while the
#   unrelated reader progressed) FREEZES (same, unrelated reader frozen too) WORST_STALL_MS
#   ITS_WINDOW_MS LONGEST_READ_OVERLAPPING_A_SUSPEND_MS LONGEST_READ_OUTSIDE_MS WINDOWS_50MS
#   NOISE EXPECTED (reads the middle halves of the windows would hold at the rate outside)
# fio's lat logs: one line per read, "completion time (epoch ms), latency (ns), ...".
cat >/tmp/windows.awk <<'AWK'
function tod(ts,   a, b) { split(ts, a, "T"); split(a[2], b, ":"); return (b[1] * 3600 + b[2] * 60 + b[3]) * 1000 }
FILENAME == ARGV[1] {
    if ($0 ~ /chunk remapped/ && first == "") first = tod($1)
    else if ($0 ~ /remap batch done/) {
        match($0, /suspended_micros=[0-9]+/)
        d = substr($0, RSTART + 17, RLENGTH - 17) / 1000
        e = (first == "" ? tod($1) : first)
        ws[nw] = e - d; we[nw] = e; nw++; first = ""
    }
    next
}
FILENAME == ARGV[2] { bc[nb++] = ($1 + 0) % 86400000; next }
{
    c = ($1 + 0) % 86400000; l = ($2 + 0) / 1e6; s = c - l
    if (n == 0) t0 = s
    n++; t1 = c
    while (wc < nw && we[wc] < c) wc++
    if (wc < nw && ws[wc] <= c) { inwin++; q = (we[wc] - ws[wc]) / 4; if (c > ws[wc] + q && c < we[wc] - q) inint[wc]++ }
    while (wo < nw && we[wo] < s) wo++
    ov = 0; lw = 0
    for (k = wo; k < nw && ws[k] < c; k++) { ov = 1; d = we[k] - ws[k]; if (d >= 50 && l >= 0.8 * d) lw = d }
    if (ov) { if (l > ovmax) ovmax = l } else if (l > outmax) outmax = l
    if (lw || (!ov && l >= 40)) {
        while (jb < nb && bc[jb] <= s + 2) jb++
        p = 0
        for (j = jb; j < nb && bc[j] < c - 2; j++) p++
        if (lw) { if (p) { stalls++; if (l > worst) { worst = l; wwin = lw } } else freezes++ }
        else if (p) noise++
    }
}
END {
    for (i = 0; i < nw; i++) {
        a = (ws[i] > t0 ? ws[i] : t0); b = (we[i] < t1 ? we[i] : t1)
        if (b > a) susall += b - a
        if (we[i] - ws[i] < 8 || ws[i] < t0 || we[i] > t1) continue
        ev++; inside += inint[i]; intms += (we[i] - ws[i]) / 2; if (we[i] - ws[i] >= 50) ev50++
    }
    outrate = (t1 - t0 - susall > 0) ? (n - inwin) / (t1 - t0 - susall) : 0
    ratio = (intms > 0 && outrate > 0) ? 100 * inside / intms / outrate : 0
    printf "%d %d %.0f %.0f %d %d %.1f %.1f %.1f %.1f %d %d %.0f\n", ev, inside, intms, ratio, stalls, freezes, worst, wwin, ovmax, outmax, ev50, noise, intms * outrate
}
AWK

# lat FILE: "MAX P99 P99.9 N" (ns) of the read latencies in fio's JSON.
lat() {
    awk -F' : ' '/"read" : \{/ { r = 1 } r && /"lat_ns" : \{/ { l = 1 }
        l && /"max"/ && max == "" { max = $2 + 0 } l && /"N"/ && n == "" { n = $2 + 0 }
        l && /"99.000000"/ { p99 = $2 + 0 } l && /"99.900000"/ { print max, p99, $2 + 0, n; exit }' "$1"
}
# measure STORM_OFFSET READER_OFFSET READER_SIZE NAME: a storm of 1 sequential 2 MiB read/s
# for 10 s from STORM_OFFSET (going on past errors); 1 s into it the reader for 1 + 8 s and
# the unrelated reader. Sets MAX P99 P999 N (ns), BATCHES (remap batches that ended
# meanwhile), and from the windows (see windows.awk) EV INSIDE INTMS RATIO STALLS FREEZES
# WORST WWIN OVMS OUTMS EV50 NOISE EXPECT.
measure() {
    name=$4
    fio --name=storm --filename=/dev/mapper/$VOL --rw=read --bs=2M --direct=1 --ioengine=psync \
        --offset="$1" --size=20M --rate_iops=1 --runtime=10 --time_based --continue_on_error=read \
        --output-format=json >/tmp/storm-$name.json 2>/tmp/storm-$name.err &
    sp=$!
    sleep 1
    b0=$(grep -c 'remap batch done' /tmp/remapd.log)
    fio --name=unrelated --filename="$other" --rw=randread --bs=4k --direct=1 --ioengine=psync --runtime=9 \
        --time_based --write_lat_log=/tmp/u-$name --log_avg_msec=0 --log_unix_epoch=1 --clocksource=clock_gettime \
        --output-format=json >/tmp/u-$name.json 2>&1 &
    up=$!
    fio --name=reader --filename=/dev/mapper/$VOL --rw=randread --bs=4k --direct=1 --ioengine=psync \
        --iodepth=1 --offset="$2" --size="$3" --ramp_time=1 --runtime=8 --time_based --lat_percentiles=1 \
        --write_lat_log=/tmp/$name --log_avg_msec=0 --log_unix_epoch=1 --clocksource=clock_gettime \
        --output-format=json >/tmp/$name.json 2>/tmp/$name.err
    BATCHES=$(($(grep -c 'remap batch done' /tmp/remapd.log) - b0))
    wait $sp $up
    set -- $(lat /tmp/$name.json)
    MAX=${1:-0} P99=${2:-0} P999=${3:-0} N=${4:-0}
    set -- $(awk -f /tmp/windows.awk /tmp/remapd.log /tmp/u-${name}_lat.1.log /tmp/${name}_lat.1.log)
    EV=${1:-0} INSIDE=${2:-0} INTMS=${3:-0} RATIO=${4:-0} STALLS=${5:-0} FREEZES=${6:-0}
    WORST=${7:-0} WWIN=${8:-0} OVMS=${9:-0} OUTMS=${10:-0} EV50=${11:-0} NOISE=${12:-0} EXPECT=${13:-0}
    info "$name: max $((MAX / 1000)) us, p99 $((P99 / 1000)) us, p99.9 $((P999 / 1000)) us, $N reads;" \
        "$BATCHES remap batches meanwhile, $EV suspend windows >= 8 ms: $INSIDE reads completed in" \
        "${INTMS} ms of their middle halves ($EXPECT at the rate outside), rate $RATIO% of the rate outside; of $EV50 windows >= 50 ms, $STALLS" \
        "were waited out by a read (worst $WORST ms in $WWIN ms), $FREEZES VM freezes; reads >= 40 ms" \
        "outside the windows while the VM ran: $NOISE; longest read overlapping a suspend $OVMS ms, outside $OUTMS ms"
}

# Bad, added after the baselines: 0-20 MiB (region 0) and 32-52 MiB (region 1) in stripes of
# 512 sectors with one good chunk between them: on 6.1, null_blk's bad-block table is
# corrupted by ranges longer than 512 sectors (or adjacent ones, which it merges) and then
# misses reads. The control's storm runs in region 1 and its reader reads 56-64 MiB (region
# 1, never bad).
measure 0 96M 32M base-r3
B_MAX=$MAX B_P99=$P99
measure 32M 56M 8M base-r1
C_MAX=$MAX C_P99=$P99
if [ "$B_P99" -gt 0 ] && [ "$C_P99" -gt 0 ] && [ "$BATCHES" = 0 ] && [ "$(num remaps)" = 0 ]; then
    pass setup "baselines: region 3 max $((B_MAX / 1000)) us p99 $((B_P99 / 1000)) us; region 1 max $((C_MAX / 1000)) us p99 $((C_P99 / 1000)) us"
else
    fail setup "baseline runs: p99 $B_P99 / $C_P99 ns, remaps $(num remaps): $(tail -3 /tmp/base-r3.err)"
    exit 1
fi
for s in $(seq 0 520 40959) $(seq 65536 520 106495); do nullb bad add "$main" $s-$((s + 511)); done

# --- the reader of region 3 during a storm in region 0
measure 0 96M 32M storm-r3
bound=$((B_P99 * 5))
[ "$B_MAX" -gt $bound ] && bound=$B_MAX
info "for reference, max(5 x baseline p99, baseline max) = $((bound / 1000)) us; during: $((MAX / 1000)) us"
if [ "$EV" -lt 1 ] || [ "$EXPECT" -lt 40 ]; then
    # Too few long suspends to judge (a fast run): inconclusive, not a pass.
    skip other-region-no-pause "inconclusive: $EV suspend windows of 8 ms or more during the measurement ($BATCHES batches), room for $EXPECT reads in them (40 needed to judge)"
elif [ "$RATIO" -lt 25 ]; then
    fail other-region-no-pause "the reader of region 3 nearly stops while region 0 is suspended: $INSIDE reads in $INTMS ms of suspends, $RATIO% of its rate outside them"
elif [ "$STALLS" -ge 2 ] && [ $((STALLS * 4)) -ge "$EV50" ]; then
    fail other-region-no-pause "reads of region 3 waited out $STALLS of $EV50 suspends of region 0 of 50 ms or more (worst $WORST ms in a $WWIN ms suspend) while the rest of the VM ran"
else
    pass other-region-no-pause "$BATCHES batches, $EV suspends >= 8 ms: region 3 read on at $RATIO% of its normal rate inside them," \
        "$STALLS of $EV50 suspends >= 50 ms waited out by a read ($FREEZES VM freezes left out); max $((MAX / 1000)) us (baseline $((B_MAX / 1000)) us)," \
        "p99 $((P99 / 1000)) us (baseline $((B_P99 / 1000)) us); longest read overlapping a suspend $OVMS ms, outside $OUTMS ms; $(num remaps) remaps"
fi

# --- control: the same storm in region 1, the reader in region 1 too
measure 32M 56M 8M storm-r1
if [ "$EV" -lt 1 ] || [ "$EXPECT" -lt 40 ]; then
    skip control-same-region "inconclusive: $EV suspend windows of 8 ms or more during the measurement ($BATCHES batches), room for $EXPECT reads in them (40 needed to judge)"
elif [ "$RATIO" -lt 25 ]; then
    pass control-same-region "the reader of region 1 nearly stops while it is suspended: $RATIO% of its rate outside;" \
        "$STALLS of $EV50 suspends >= 50 ms waited out by a read (worst $WORST ms); p99 $((P99 / 1000)) us (baseline $((C_P99 / 1000)) us), max $((MAX / 1000)) us"
else
    fail control-same-region "the measurement cannot see a pause: the reader of the suspended region read on at $RATIO% of its rate outside the suspends"
fi

remapctl stop $VOL >/dev/null
kill -TERM $agent
wait $agent
exit 0
