# Shared by the boots of powercut-storm (sourced; not a boot of its own).
. /vm/lib.sh

VOL=vol0
DEV=/dev/mapper/$VOL
MAIN=/dev/disk/by-vm/main
S1=/dev/disk/by-vm/s1
S2=/dev/disk/by-vm/s2
LOG=$(vmdisk log)
# 64 workload blocks (4 KiB = one chunk each), one every 256 chunks: all four regions.
BLOCKS=$(awk 'BEGIN { for (k = 0; k < 64; k++) printf "%d ", k * 256 + 17 }')
# blkdebug fails every read of this main-disk sector (see 1-create.sh): chunk 5000.
BAD_SECTOR=40000
BAD_CHUNK=5000
# The ack log disk: record i (sector i) is "ACK BOOT BLOCK SEQ" padded to 512 bytes, written
# with O_DIRECT + fsync after the block's write returned; sectors from BOOT_REC on hold one
# "BOOT N remaps R generation G" record per boot, and AUTO_REC "AUTO N" once boot N saw
# the failing chunk remapped.
BOOT_REC=16000
AUTO_REC=16200

start_agent() {
    remapd >>/tmp/remapd.out 2>>/tmp/remapd.log &
    agent=$!
    wait_for /tmp/remapd.log "remapd ready" 90
}
status() { timeout 60 remapctl status "$VOL" --json 2>/dev/null; }

# record SECTOR TEXT: one durable 512-byte record on the log disk.
record() {
    printf '%-511s\n' "$2" >/tmp/rec
    dio-write "$LOG" "$1" 1 /tmp/rec
}

# read_log: the contiguous valid ACK records into /tmp/acks ("BOOT BLOCK SEQ"), the number of
# them in NEXT_ACK (where this boot appends), the boot records into /tmp/boots.
read_log() {
    /usr/bin/dd if="$LOG" of=/tmp/log.img bs=512 count=$BOOT_REC iflag=direct status=none
    tr -d '\000' </tmp/log.img | awk 'length($0) == 511 && $1 == "ACK" && NF == 4 { print $2, $3, $4; next } { exit }' >/tmp/acks
    NEXT_ACK=$(wc -l </tmp/acks | tr -d ' ')
    /usr/bin/dd if="$LOG" bs=512 skip=$BOOT_REC iflag=direct status=none | tr -d '\000' |
        awk 'length($0) == 511 && $1 == "BOOT" { print $2, $4, $6 }' >/tmp/boots
    AUTO=$(/usr/bin/dd if="$LOG" bs=512 skip=$AUTO_REC count=1 iflag=direct status=none | tr -d '\000' | awk '$1 == "AUTO" { print $2 }')
}

# verify_acked CASE: every workload block holds a sequence number at least the last one
# acknowledged for it in any earlier boot.
verify_acked() {
    awk '{ if ($3 > m[$2]) m[$2] = $3 } END { for (b in m) print b, m[b] }' /tmp/acks >/tmp/acked
    bad="" n=0
    for b in $BLOCKS; do
        want=$(awk -v b="$b" '$1 == b { print $2 }' /tmp/acked)
        if ! got=$(seqblock read "$DEV" "$b" 2>&1); then
            bad="$bad $got;"
        elif [ "$got" -lt "${want:-0}" ]; then
            bad="$bad block $b holds seq $got, seq $want was acknowledged;"
        fi
        [ -n "$want" ] && n=$((n + 1))
    done
    if [ -z "$bad" ]; then
        pass "$1" "boot $VM_BOOT: $NEXT_ACK acks so far, $n of 64 blocks written, all hold their last acknowledged write or a later one"
    else
        fail "$1" "boot $VM_BOOT:$(printf '%s' "$bad" | head -c 600)"
    fi
}

# check_extents CASE: remaps == extents in use, each extent owned once, none in the
# metadata area.
check_extents() {
    st=$(status)
    r=$(json_num "$st" remaps)
    used=$(printf '%s\n' "$st" | grep -o '"used":[0-9]*' | cut -d: -f2 | awk '{ s += $1 } END { print s + 0 }')
    area=$(($(dd if="$S1" bs=4096 count=1 iflag=direct status=none | od -An -t u8 -j 80 -N 8 | tr -d ' ') / 512))
    timeout 60 remapctl remap list "$VOL" --json 2>/dev/null | grep -o '"spare_sector":[0-9]*,"spare_slot":[0-9]*' |
        sed 's/"spare_sector":\([0-9]*\),"spare_slot":\([0-9]*\)/\2 \1/' >/tmp/extents
    dup=$(sort /tmp/extents | uniq -d | head -3 | tr '\n' ';')
    inarea=$(awk -v a="$area" '$2 < a' /tmp/extents | head -3 | tr '\n' ';')
    if [ -n "$r" ] && [ "$r" = "$used" ] && [ "$(wc -l </tmp/extents | tr -d ' ')" = "$r" ] && [ -z "$dup$inarea" ]; then
        pass "$1" "boot $VM_BOOT: $r remaps, $used extents in use, all distinct"
    else
        fail "$1" "boot $VM_BOOT: remaps ${r:-?}, extents used $used, listed $(wc -l </tmp/extents); owned twice: ${dup:-none}; in the metadata area: ${inarea:-none}"
    fi
}

# tables: every device's table, the volume's references to its regions written as names.
tables() {
    dmsetup ls | awk '{ gsub(/[()]/, "", $2); print $2, $1 }' >/tmp/mm
    dmsetup table | awk 'NR == FNR { m[$1] = $2; next } { for (i = 1; i <= NF; i++) if ($i in m) $i = m[$i]; print }' /tmp/mm - | sort
}

# boot_start: the agent assembles the volume the power cut left; then the checks every boot
# makes, and this boot's record.
boot_start() {
    start_agent || { fail assemble "boot $VM_BOOT: remapd not ready: $(tail -5 /tmp/remapd.log | tr '\n' ' ')"; exit 1; }
    if grep -q "assembled (created)" /tmp/remapd.log && [ -b "$DEV" ]; then
        pass assemble "boot $VM_BOOT: $(grep 'assembled (created)' /tmp/remapd.log | sed 's/.*assembled/assembled/' | head -1)"
    else
        fail assemble "boot $VM_BOOT: $(grep -E 'assembled|not assembled' /tmp/remapd.log | tr '\n' ' ')"
        exit 1
    fi
    read_log
    verify_acked acked-writes
    check_extents no-double-extent
    st=$(status)
    REMAPS=$(json_num "$st" remaps)
    GEN=$(json_num "$st" generation)
    prev=$(tail -1 /tmp/boots)
    set -- $prev
    if [ -z "$prev" ] || { [ "$REMAPS" -ge "$2" ] && [ "$GEN" -ge "$3" ]; }; then
        pass remaps-monotonic "boot $VM_BOOT: remaps $REMAPS generation $GEN (boot ${1:-none} started with ${2:-?} / ${3:-?})"
    else
        fail remaps-monotonic "boot $VM_BOOT: remaps $REMAPS generation $GEN, but boot $1 started with remaps $2 generation $3"
    fi
    record $((BOOT_REC + VM_BOOT)) "BOOT $VM_BOOT remaps $REMAPS generation $GEN" ||
        { fail assemble "boot $VM_BOOT: cannot write the log disk"; exit 1; }
}
