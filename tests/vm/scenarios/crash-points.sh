#!/bin/sh
# Crash points: remapd aborts at each named step of the remap path (REMAP_CRASH_AT) while a
# verifying writer runs over the chunks being moved and over another region; a restarted
# remapd adopts the volume, the writer carries on. Every acknowledged write verifies, no spare
# extent is owned twice, a committed remap survives, and the live tables are exactly what a
# fresh assembly from the metadata builds. Each crash point passes only if all its trials do:
# 2 trials each, 20 with --soak.
#vm: cases setup after-allocate after-copy mid-metadata after-commit after-load before-resume committed-remap-survives
#vm: needs remapd remapctl
#vm: timeout 4000
. /vm/lib.sh

VOL=vol0
DEV=/dev/mapper/$VOL
POINTS="after-allocate after-copy mid-metadata after-commit after-load before-resume"
TRIALS=2
[ "$VM_SOAK" = 1 ] && TRIALS=20
CHUNK_SECTORS=8 # remapctl create's default chunk: 4 KiB, one seqblock block
MOVED=4         # chunks each trial remaps (one request, one commit)

main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

# --- the agent
agent="" log="" starts=0
status() { timeout 60 remapctl status "$VOL" --json 2>/dev/null; }

suspended() { dmsetup info 2>/dev/null | grep -c SUSPENDED; }
resume_all() {
    for d in $(dmsetup ls | awk '{ print $1 }'); do
        dmsetup info "$d" | grep -q SUSPENDED && dmsetup resume "$d"
    done
}

# --- the writer: O_DIRECT + fsync 4 KiB self-describing blocks, in turn, for ever; a write is
# acknowledged ("BLOCK SEQ" appended to the ack log) only after seqblock returned 0.
cat >/tmp/writer.sh <<'EOF'
ack=$1 stop=$2 seq=$3 dev=$4
shift 4
while [ ! -e "$stop" ]; do
    for b in "$@"; do
        seq=$((seq + 1))
        if seqblock write "$dev" "$b" "$seq" 2>>/tmp/writer.err; then
            echo "$b $seq" >>"$ack"
        else
            echo "block $b seq $seq: write failed" >>/tmp/writer.err
        fi
        [ -e "$stop" ] && break
    done
done
EOF
acks() { wc -l <"$1" | tr -d ' '; }
wait_acks() { # ACKLOG N SECONDS
    _n=$(($3 * 10))
    while [ "$(acks "$1")" -lt "$2" ]; do
        [ $_n -le 0 ] && return 1
        sleep 0.1
        _n=$((_n - 1))
    done
}

# verify_data ACKLOG FIRST FIRST2: blocks FIRST..+15 and FIRST2..+15 each hold a sequence
# number at least the last one acknowledged for them (and their own block number, untorn).
# Appends what is wrong to /tmp/why; the contents go to /tmp/data.
verify_data() {
    { seqblock scan "$DEV" "$2" 16 && seqblock scan "$DEV" "$3" 16; } >/tmp/data 2>&1 ||
        echo "reading the blocks: $(grep -v '^[0-9]* [0-9]*$' /tmp/data | head -3 | tr '\n' ';')" >>/tmp/why
    awk 'NR == FNR { if ($2 > m[$1]) m[$1] = $2; next }
        NF == 2 && $2 < m[$1] + 0 { print "block " $1 " holds seq " $2 ", but seq " m[$1] " was acknowledged" }' "$1" /tmp/data >>/tmp/why
}

# check_pool: remaps == extents in use, every extent owned once and outside the metadata area.
check_pool() {
    st=$(status)
    r=$(json_num "$st" remaps)
    used=$(printf '%s\n' "$st" | grep -o '"used":[0-9]*' | cut -d: -f2 | awk '{ s += $1 } END { print s + 0 }')
    [ -n "$r" ] && [ "$r" = "$used" ] || echo "pool: $used extents used for ${r:-?} remaps" >>/tmp/why
    timeout 60 remapctl remap list "$VOL" --json 2>/dev/null | grep -o '"spare_sector":[0-9]*,"spare_slot":[0-9]*' |
        sed 's/"spare_sector":\([0-9]*\),"spare_slot":\([0-9]*\)/\2 \1/' >/tmp/extents
    [ "$(wc -l </tmp/extents)" = "$r" ] || echo "remap list has $(wc -l </tmp/extents) extents for $r remaps" >>/tmp/why
    d=$(sort /tmp/extents | uniq -d | head -3 | tr '\n' ';')
    [ -z "$d" ] || echo "extents owned twice: $d" >>/tmp/why
    awk -v a="$AREA" '$2 < a { print "extent " $1 ":" $2 " inside the metadata area" }' /tmp/extents >>/tmp/why
}

# --- setup: one volume for every trial
start_agent || { fail setup "remapd not ready: $(tail -5 "$log")"; exit 1; }
if ! out=$(timeout 120 remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail setup "create: $out"
    exit 1
fi
# Data extents start after the metadata area, whose size the superblock records (offset 80).
AREA=$(($(dd if="$sp1" bs=4096 count=1 iflag=direct status=none | od -An -t u8 -j 80 -N 8 | tr -d ' ') / 512))
st=$(status)
[ "$(json_num "$st" regions)" = 4 ] && [ "$(json_num "$st" chunk_size)" = 4096 ] ||
    { fail setup "unexpected geometry: $st"; exit 1; }
pass setup "4 regions of 16 MiB, 4 KiB chunks, metadata area $AREA sectors, $TRIALS trials per crash point"

# One trial: crash at $1, trial number $2 (distinct chunks each time). Reasons go to /tmp/why.
trial() {
    p=$1 i=$2
    : >/tmp/why
    # 16 blocks in region 0 around the chunks to move, 16 in region 2, interleaved.
    a=$((64 + i * 24)) b=$((8192 + 64 + i * 24)) blocks="" k=0
    while [ $k -lt 16 ]; do
        blocks="$blocks $((a + k)) $((b + k))"
        k=$((k + 1))
    done
    first=$((a + 4))
    r0=$(json_num "$(status)" remaps)

    stop_agent
    start_agent "$p" || { echo "remapd (crash at $p) not ready" >>/tmp/why; return; }
    rm -f /tmp/stop
    : >/tmp/ack
    sh /tmp/writer.sh /tmp/ack /tmp/stop $((i * 1000000)) "$DEV" $blocks &
    wpid=$!
    wait_acks /tmp/ack 32 120 || echo "writer made $(acks /tmp/ack) acks in 120 s before the remap" >>/tmp/why

    if timeout 120 remapctl remap add "$VOL" $((first * CHUNK_SECTORS)) --count $((MOVED * CHUNK_SECTORS)) >/tmp/add.out 2>&1; then
        echo "remap add succeeded: remapd did not stop at $p" >>/tmp/why
        kill -TERM "$agent"
    fi
    k=0
    while kill -0 "$agent" 2>/dev/null && [ $k -lt 300 ]; do
        sleep 0.1
        k=$((k + 1))
    done
    if kill -0 "$agent" 2>/dev/null; then
        echo "remapd still alive 30 s after the remap request: $(tail -2 /tmp/add.out | tr '\n' ' ')" >>/tmp/why
        kill -KILL "$agent"
    fi
    wait "$agent"
    rc=$?
    [ $rc = 134 ] || echo "remapd exited with $rc, not an abort (134)" >>/tmp/why
    grep -q "REMAP_CRASH_AT=$p: aborting" "$log" || echo "no crash message in the log" >>/tmp/why
    crashed_susp=$(suspended)
    echo "$crashed_susp region(s) suspended at the crash" >>/tmp/trial.notes
    n0=$(acks /tmp/ack)
    sleep 1

    start_agent || echo "restarted remapd not ready: $(tail -3 "$log" | tr '\n' ' ')" >>/tmp/why
    grep -q "assembled (adopted)" "$log" || echo "not adopted: $(grep -E 'assembled|not assembled' "$log" | tr '\n' ' ')" >>/tmp/why
    # The writer may have been blocked on a suspended region: it must go on, a full round.
    wait_acks /tmp/ack $((n0 + 32)) 120 || echo "writer stuck after the restart: $(acks /tmp/ack) acks, had $n0" >>/tmp/why
    # A table prepared for the remap but never made live must be gone: a later resume would
    # make it live.
    if dmsetup info 2>/dev/null | grep -q "INACTIVE"; then
        echo "inactive tables left after the restart: $(dmsetup info | grep -B3 INACTIVE | grep Name | tr -s ' ' | tr '\n' ' ')" >>/tmp/why
    fi
    if [ "$(suspended)" != 0 ]; then
        echo "devices still suspended after the restart: $(dmsetup info | grep -B2 SUSPENDED | grep Name | tr -s ' ' | tr '\n' ' ')" >>/tmp/why
        resume_all # so the writer can finish and the next trial run
    fi
    touch /tmp/stop
    wait "$wpid"

    verify_data /tmp/ack $a $b
    cp /tmp/data /tmp/data.live
    check_pool
    r1=$(json_num "$(status)" remaps)
    timeout 60 remapctl remap list "$VOL" --json 2>/dev/null | grep -o '"chunk":[0-9]*' | cut -d: -f2 >/tmp/chunks
    moved=0 k=0
    while [ $k -lt $MOVED ]; do
        grep -qx $((first + k)) /tmp/chunks && moved=$((moved + 1))
        k=$((k + 1))
    done
    case "$p" in
    after-allocate | after-load | after-copy)
        [ "$r1" = "$r0" ] && [ $moved = 0 ] || echo "remaps $r0 -> $r1 ($moved of the chunks listed): nothing was committed" >>/tmp/why ;;
    mid-metadata)
        # The journal block reached the first spare only: the newest complete copy wins,
        # which may hold the remap or not, but all or nothing.
        { [ "$r1" = "$r0" ] && [ $moved = 0 ]; } || { [ "$r1" = $((r0 + MOVED)) ] && [ $moved = $MOVED ]; } ||
            echo "remaps $r0 -> $r1 ($moved of $MOVED chunks listed): not all or nothing" >>/tmp/why
        echo "mid-metadata: remaps $r0 -> $r1" >>/tmp/trial.notes ;;
    *)
        if [ "$r1" = $((r0 + MOVED)) ] && [ $moved = $MOVED ]; then
            echo ok >>/tmp/survived
        else
            echo "$p trial $i: remaps $r0 -> $r1, $moved of $MOVED chunks listed" >>/tmp/survived
            echo "committed remap lost: remaps $r0 -> $r1, $moved of $MOVED chunks listed" >>/tmp/why
        fi ;;
    esac

    # The live tables must be what a fresh assembly builds from the metadata alone.
    live=$(dm_tables)
    stop_agent
    dmsetup remove "$VOL" || echo "dmsetup remove $VOL failed" >>/tmp/why
    for d in $(dmsetup ls | awk '{ print $1 }' | grep "^$VOL-remap-"); do
        dmsetup remove "$d" || echo "dmsetup remove $d failed" >>/tmp/why
    done
    [ "$(dmsetup ls)" = "No devices found" ] || echo "devices left: $(dmsetup ls | tr '\n' ' ')" >>/tmp/why
    start_agent || echo "remapd not ready for the fresh assembly" >>/tmp/why
    grep -q "assembled (created)" "$log" || echo "fresh assembly: $(grep -E 'assembled|not assembled' "$log" | tr '\n' ' ')" >>/tmp/why
    fresh=$(dm_tables)
    if [ "$live" != "$fresh" ]; then
        echo "live tables differ from a fresh assembly: $(printf '%s\n' "$live" >/tmp/t1; printf '%s\n' "$fresh" >/tmp/t2; diff /tmp/t1 /tmp/t2 | grep '^[-+][^-+]' | head -6 | tr '\n' ';')" >>/tmp/why
    fi
    verify_data /tmp/ack $a $b
    cmp -s /tmp/data.live /tmp/data || echo "data changed across the fresh assembly: $(diff /tmp/data.live /tmp/data | grep '^[-+][^-+]' | head -4 | tr '\n' ';')" >>/tmp/why
    [ -s /tmp/writer.err ] && echo "writes failed: $(head -3 /tmp/writer.err | tr '\n' ';')" >>/tmp/why
    rm -f /tmp/writer.err
    echo "suspended at the crash: $crashed_susp; acks $(acks /tmp/ack); remaps $r0 -> $r1" >/tmp/trial.info
}

i=0
: >/tmp/survived
for p in $POINTS; do
    bad=0 t=1 first_why=""
    : >/tmp/trial.notes
    t0=$(date +%s)
    while [ $t -le $TRIALS ]; do
        trial "$p" $i
        if [ -s /tmp/why ]; then
            bad=$((bad + 1))
            info "$p trial $t: $(cat /tmp/trial.info 2>/dev/null): $(head -5 /tmp/why | tr '\n' ';')"
            [ -n "$first_why" ] || first_why="trial $t: $(head -3 /tmp/why | tr '\n' ';')"
        fi
        rm -f /tmp/trial.info
        i=$((i + 1))
        t=$((t + 1))
    done
    note="$(sort /tmp/trial.notes | uniq -c | tr -s ' ' | tr '\n' ';')"
    if [ $bad = 0 ]; then
        pass "$p" "$TRIALS of $TRIALS trials in $(($(date +%s) - t0)) s ${note}"
    else
        fail "$p" "$bad of $TRIALS trials failed; $first_why"
    fi
done

ok=$(grep -cx ok /tmp/survived)
if [ "$ok" -gt 0 ] && [ "$ok" = "$(wc -l </tmp/survived | tr -d ' ')" ]; then
    pass committed-remap-survives "$ok trials crashed at or after after-commit; every remap was kept"
else
    fail committed-remap-survives "$(grep -vx ok /tmp/survived | head -3 | tr '\n' ';')"
fi
stop_agent
exit 0
