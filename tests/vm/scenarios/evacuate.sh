#!/bin/sh
# Evacuation: a volume with remaps and pending blocks moves onto a new disk while fio writes
# and verifies on it and a new bad sector appears on the old disk ahead of the copy:
#   - the first pass skips the window of the new bad sector and the second comes back for it;
#   - every block reads back (fio verifies its own range; the rest is compared with a copy
#     taken before), the pending blocks still fail reads, and a rewrite of one reads back
#     (6.12: dm-flakey error_reads; 6.1: policy error, writes fail too);
#   - the new disk is the main, the pool holds only the chunk the new disk refuses (the other
#     pending chunks are at home on the new disk, failing reads there), and the volume keeps
#     working with the old disk powered off (null_blk power 0);
#   - remapd killed at each step of an evacuation (after a window's copy, after its commit,
#     after folding remaps in) and restarted resumes it to the end, the writer verifying;
#   - a sector that goes bad on the new disk in a chunk already moved there is found by a read
#     like one on the main: the chunk moves to the pool, its bad block pending;
#   - --abort moves every chunk back: the old disk is the main again, nothing lost.
#vm: cases setup evacuate-live target-bad fio-during pending-kept rewrite-pending pool-freed old-disk-off crash-resume abort
#vm: needs remapd remapctl
#vm: timeout 900
. /vm/lib.sh

VOL=vol0
DEV=/dev/mapper/$VOL
MIB=1048576
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)
new=$(nullb create --size 64)
new2=$(nullb create --size 64)
D=2048 # the volume's data starts 1 MiB into each main (remap's header)

agent="" starts=0
start_agent() { # [CRASH_POINT]
    starts=$((starts + 1))
    if [ -n "$1" ]; then
        REMAP_CRASH_AT=$1 remapd >>/tmp/remapd.out 2>>/tmp/remapd.log &
    else
        remapd >>/tmp/remapd.out 2>>/tmp/remapd.log &
    fi
    agent=$!
    n=0
    until remapctl status >/dev/null 2>&1 || [ $n -gt 600 ]; do sleep 0.1; n=$((n + 1)); done
}
status() { remapctl status $VOL --json 2>/dev/null; }
evac() { remapctl evacuate $VOL --status --json 2>/dev/null; }
# wait_state STATE SECONDS: until the evacuation says STATE (or the agent died)
wait_state() {
    n=0
    while [ $n -lt $(($2 * 10)) ]; do
        [ "$(json_str "$(evac)" state)" = "$1" ] && return 0
        kill -0 "$agent" 2>/dev/null || return 1
        sleep 0.1
        n=$((n + 1))
    done
    return 1
}

# The foreground writer: random 4 KiB writes over MiB 32-39 of the volume, each pass then read
# back and verified by fio itself (verify=crc32c); `fg_verify` re-reads the last pass.
fgjob() {
    {
        echo "[global]"
        echo "filename=$DEV"
        echo "offset=32M"
        echo "size=8M"
        echo "bs=4k"
        echo "direct=1"
        echo "ioengine=psync"
        echo "verify=crc32c"
        echo "rw=randwrite"
        echo "rate_iops=100"
        echo "randseed=$1"
        for o in "$@"; do case "$o" in *=*) echo "$o" ;; esac; done
        echo "[fg]"
    } >/tmp/fg.fio
}
# fg_loop FLAGFILE: passes until FLAGFILE exists; counts passes and errors in /tmp/fg.res
fg_loop() {
    passes=0 errs=0 seed=1
    while [ ! -e "$1" ]; do
        seed=$((seed + 1))
        fgjob $seed
        if fio /tmp/fg.fio --output-format=terse >/tmp/fg.out 2>/tmp/fg.err; then
            passes=$((passes + 1))
        else
            errs=$((errs + 1))
            cp /tmp/fg.err /tmp/fg.lasterr
        fi
        echo "$passes $errs $seed" >/tmp/fg.res
    done
}
fg_verify() { # the last pass's data, read back and verified
    seed=$(cut -d' ' -f3 /tmp/fg.res)
    fgjob "$seed" verify_only=1
    fio /tmp/fg.fio --output-format=terse >/tmp/fgv.out 2>/tmp/fgv.err
}

# cmp_golden CASE: the volume against /tmp/golden, MiB by MiB; in the MiBs holding pending
# blocks, block by block (those must fail reads, the rest match).
cmp_golden() {
    ok=1 n=0
    for m in $(seq 0 $((SIZE / MIB - 1))); do
        case " $PENDING_MIBS " in
        *" $m "*)
            # The pending sectors must fail reads; the stretches between them (one O_DIRECT
            # read each) must match.
            a=$((m * 2048))
            for p in $(printf '%s\n' $PENDING_SECTORS $(((m + 1) * 2048)) | sort -n); do
                [ "$p" -ge "$a" ] && [ "$p" -le $(((m + 1) * 2048)) ] || continue
                if [ "$p" -gt "$a" ]; then
                    dio-read $DEV "$a" $((p - a)) /tmp/got 2>/dev/null || { fail "$1" "sectors $a-$((p - 1)) fail reads"; ok=0; }
                    dd if=/tmp/golden of=/tmp/want bs=512 skip="$a" count=$((p - a)) status=none
                    cmp -s /tmp/got /tmp/want || { fail "$1" "sectors $a-$((p - 1)) differ"; ok=0; }
                fi
                if [ "$p" -lt $(((m + 1) * 2048)) ]; then
                    dio-read $DEV "$p" 1 2>/dev/null && { fail "$1" "pending sector $p read"; ok=0; }
                fi
                a=$((p + 1))
            done
            ;;
        *)
            dd if=$DEV of=/tmp/got bs=1M skip=$m count=1 iflag=direct status=none 2>/dev/null ||
                { fail "$1" "MiB $m fails reads"; ok=0; }
            dd if=/tmp/golden of=/tmp/want bs=1M skip=$m count=1 status=none
            cmp -s /tmp/got /tmp/want || { fail "$1" "MiB $m differs ($(cmp /tmp/got /tmp/want | head -1))"; ok=0; }
            ;;
        esac
        n=$((n + 1))
        [ $ok = 1 ] || break
    done
    [ $ok = 1 ] && info "$1: $n MiB compared"
    [ $ok = 1 ]
}

# --- setup: a volume with a header, written through, a pending block and a healthy remap
start_agent
if ! out=$(remapctl create $VOL --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail setup "$out"
    exit 1
fi
SIZE=$(json_num "$(status)" size_bytes)
head -c "$SIZE" /dev/urandom >/tmp/golden
dd if=/tmp/golden of=$DEV bs=1M oflag=direct status=none
PB1=1000                      # pending from the start (volume block, 4 KiB)
PB2=$((SIZE / 4096 - 300))    # goes bad on the old disk after the evacuation started
PB3=300                       # goes bad on the new disk once the sweep moved it there
PENDING_BLOCKS="$PB1 $PB2 $PB3"
PENDING_SECTORS="$((PB1 * 8 + 3)) $((PB2 * 8 + 5)) $((PB3 * 8 + 2))" # the bad sectors added below
PENDING_MIBS="$((PB1 / 256)) $((PB2 / 256)) $((PB3 / 256))"
nullb bad add "$main" $((D + PB1 * 8 + 3))-$((D + PB1 * 8 + 3))
dio-read $DEV $((PB1 * 8)) 8 2>/dev/null && info "block $PB1 read"
n=0
while [ "$(json_num "$(status)" pending)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
remapctl remap add $VOL $((3000 * 8)) --count 8 >/dev/null
st=$(status)
expect_eq setup remaps 2 "$(json_num "$st" remaps)" && expect_eq setup pending 1 "$(json_num "$st" pending)" &&
    pass setup "$((SIZE / MIB)) MiB volume, one pending block, one healthy remap"
pool_total=$(remapctl spare list $VOL --json | grep -o '"total":[0-9]*' | tr -dc '0-9\n' | awk '{ s += $1 } END { print s }')

# --- the evacuation, paced so that the writer and the new bad sector meet it under way
rm -f /tmp/fg.stop /tmp/fg.res
fg_loop /tmp/fg.stop &
fg=$!
if ! out=$(remapctl evacuate $VOL --to "$new" --rate 4 --background 2>&1); then
    fail evacuate-live "$out"
    touch /tmp/fg.stop
    wait $fg
    exit 1
fi
info "started: $out"
nullb bad add "$main" $((D + PB2 * 8 + 5))-$((D + PB2 * 8 + 5))
at_bad=$(json_num "$(evac)" done_bytes)
info "the old disk's block $PB2 went bad with $at_bad bytes moved"
n=0
while [ "$(json_num "$(evac)" done_bytes)" -le $(((PB3 + 1) * 4096)) ] && [ $n -lt 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
nullb bad add "$new" $((D + PB3 * 8 + 2))-$((D + PB3 * 8 + 2))
if dio-read $DEV $((PB3 * 8)) 8 2>/dev/null; then
    fail target-bad "block $PB3 read back from a bad sector of the new disk"
else
    n=0
    while [ "$(json_num "$(status)" pending)" != 2 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    expect_eq target-bad pending 2 "$(json_num "$(status)" pending)" &&
        pass target-bad "block $PB3 failed on the new disk after it moved there: remapped, pending"
fi
if wait_state done 600; then
    # The old disk's new bad block was met by the first pass, which skipped its window and
    # came back for it after the rest (pending-kept checks that block).
    skipped=$(grep -c "first pass could not copy" /tmp/remapd.log)
    if [ "$skipped" -ge 1 ]; then
        pass evacuate-live "$(grep -c 'evacuation' /tmp/remapd.log) log lines, $skipped window(s) skipped by the first pass; events: $(remapctl events | grep -c evac)"
    else
        fail evacuate-live "the first pass never skipped the window of block $PB2: $(grep -i evacuat /tmp/remapd.log | tail -5)"
    fi
else
    fail evacuate-live "not done: $(evac) $(tail -3 /tmp/remapd.log)"
fi
touch /tmp/fg.stop
wait $fg
read -r passes errs _ </tmp/fg.res
if expect_eq fio-during "fio passes that failed" 0 "$errs" && [ "$passes" -ge 1 ] && fg_verify; then
    pass fio-during "$passes write+verify passes during the evacuation, the last verified again after"
else
    fail fio-during "passes $passes errors $errs: $(cat /tmp/fg.lasterr /tmp/fgv.err 2>/dev/null | tail -3)"
fi
# The writer's range is fio's; the rest must be the golden copy.
dd if=$DEV of=/tmp/fgrange bs=1M skip=32 count=8 iflag=direct status=none
dd if=/tmp/fgrange of=/tmp/golden bs=1M seek=32 count=8 conv=notrunc status=none

st=$(status)
if [ "$(json_num "$st" pending)" = 3 ] && cmp_golden pending-kept; then
    pass pending-kept "blocks $PENDING_BLOCKS fail reads, every other block matches"
else
    fail pending-kept "pending $(json_num "$st" pending)"
fi
used=$(remapctl spare list $VOL --json | grep -o '"used":[0-9]*' | tr -dc '0-9\n' | awk '{ s += $1 } END { print s }')
home=$(remapctl remap list $VOL --json | grep -o '"home":true' | wc -l)
info "remaps after the evacuation: $(remapctl remap list $VOL --json)"
expect_eq pool-freed main "$new" "$(json_str "$st" main)" &&
    expect_eq pool-freed remaps 3 "$(json_num "$st" remaps)" &&
    expect_eq pool-freed "pending chunks at home on the new main" 2 "$home" &&
    expect_eq pool-freed "pool chunks used" 1 "$used" &&
    pass pool-freed "main $new, 1 of $pool_total pool chunks used (block $PB3's, which the new disk refuses); the other two pending chunks at home on it"

# --- the old disk goes away
nullb power "$main" off
head -c 4096 /dev/urandom >/tmp/blk
if dio-write $DEV 80 8 /tmp/blk && dio-read $DEV 80 8 /tmp/got && cmp -s /tmp/blk /tmp/got; then
    dd if=/tmp/blk of=/tmp/golden bs=4096 seek=10 conv=notrunc status=none
    cmp_golden old-disk-off && pass old-disk-off "the volume reads and writes with the old disk powered off"
else
    fail old-disk-off "a write and read back failed"
fi

# --- a rewrite of a pending block reads back (where writes pass)
head -c 4096 /dev/urandom >/tmp/blk
case "$(json_str "$st" pending_mode)" in
error-reads)
    # The write passes to the new main at once; the block reads again once the agent has seen
    # the write and switched its table (a read before that still fails: never old data).
    if dio-write $DEV $((PB1 * 8)) 8 /tmp/blk; then
        dd if=/tmp/blk of=/tmp/golden bs=4096 seek=$PB1 conv=notrunc status=none
        n=0
        while [ "$(json_num "$(status)" pending)" != 2 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
        if expect_eq rewrite-pending pending 2 "$(json_num "$(status)" pending)" &&
            dio-read $DEV $((PB1 * 8)) 8 /tmp/got && cmp -s /tmp/blk /tmp/got; then
            pass rewrite-pending "block $PB1 rewritten on the new main's volume reads back ($((n * 100)) ms)"
        else
            fail rewrite-pending "block $PB1 rewritten does not read back: $(grep -i 'rewrit' /tmp/remapd.log | tail -3); pending chunks: $(bpftool -j map dump pinned /sys/fs/bpf/remap/PENDING_CHUNKS | tr -d ' \n'); watched: $(bpftool -j map dump pinned /sys/fs/bpf/remap/WATCHED_DEVS | tr -d ' \n'); new $(stat -L -c '%t:%T' $new)"
        fi
    else
        fail rewrite-pending "the rewrite of block $PB1 failed"
    fi
    PENDING_BLOCKS="$PB2 $PB3"
    PENDING_SECTORS="$((PB2 * 8 + 5)) $((PB3 * 8 + 2))"
    ;;
*)
    skip rewrite-pending "kernel $VM_KERNEL: no dm-flakey error_reads; a pending block refuses writes too"
    ;;
esac

# --- killed at each step, restarted: it resumes to the end
rm -f /tmp/fg.stop /tmp/fg.res
fg_loop /tmp/fg.stop &
fg=$!
# A healthy remap, for the fold step to fold in.
remapctl remap add $VOL $((5000 * 8)) --count 8 >/dev/null || fail crash-resume "remap add failed"
ok=1
for point in evacuate-after-copy evacuate-after-commit evacuate-after-fold; do
    kill -TERM $agent
    wait $agent
    start_agent $point
    [ "$point" = evacuate-after-copy ] && remapctl evacuate $VOL --to "$new2" --background >/dev/null
    # The agent aborts at the point (the fold comes after the whole sweep).
    n=0
    while kill -0 $agent 2>/dev/null && [ $n -lt 3000 ]; do sleep 0.1; n=$((n + 1)); done
    if kill -0 $agent 2>/dev/null; then
        fail crash-resume "remapd never reached $point"
        ok=0
        break
    fi
    wait $agent
done
start_agent
if [ $ok = 1 ] && wait_state done 600; then
    touch /tmp/fg.stop
    wait $fg
    read -r passes errs _ </tmp/fg.res
    dd if=$DEV of=/tmp/fgrange bs=1M skip=32 count=8 iflag=direct status=none
    dd if=/tmp/fgrange of=/tmp/golden bs=1M seek=32 count=8 conv=notrunc status=none
    st=$(status)
    expect_eq crash-resume main "$new2" "$(json_str "$st" main)" &&
        expect_eq crash-resume "fio passes that failed" 0 "$errs" && fg_verify &&
        cmp_golden crash-resume &&
        pass crash-resume "killed after a copy, a commit and a fold, resumed each time; $passes writer passes"
else
    touch /tmp/fg.stop
    wait $fg
    [ $ok = 1 ] && fail crash-resume "not done after the restarts: $(evac) $(tail -3 /tmp/remapd.log)"
fi

# --- abort: under way onto the old disk (powered on again), then taken back
nullb power "$main" on
sleep 1
if out=$(remapctl evacuate $VOL --to "$main" --rate 2 --background 2>&1); then
    n=0
    while [ "$(json_num "$(evac)" done_bytes)" -lt $((8 * MIB)) ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
    head -c 4096 /dev/urandom >/tmp/blk
    dio-write $DEV 16 8 /tmp/blk && dd if=/tmp/blk of=/tmp/golden bs=4096 seek=2 conv=notrunc status=none
    at=$(json_num "$(evac)" done_bytes)
    remapctl evacuate $VOL --abort >/dev/null
    if wait_state aborted 600; then
        st=$(status)
        expect_eq abort main "$new2" "$(json_str "$st" main)" && cmp_golden abort &&
            pass abort "aborted at $at bytes; everything back on $new2; $(json_num "$st" remaps) remaps (chunks the old disk refused)"
    else
        fail abort "not aborted: $(evac)"
    fi
else
    fail abort "$out"
fi
kill -TERM $agent
wait $agent
exit 0
