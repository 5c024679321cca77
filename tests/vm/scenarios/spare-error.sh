#!/bin/sh
# Errors on a spare extent are remapped again: a chunk already moved to the pool goes bad on
# its spare; a read through the volume fails there, the agent (which watches spares too) moves
# the chunk to another extent, its readable blocks read back identical, the block that went bad
# on the spare is pending, and the pool shows the old extent released. A known-bad extent must
# not be handed out again: the next remap lands elsewhere and succeeds.
#vm: cases manual-remap spare-error-remapped data-identical pending-exact old-extent-released bad-extent-not-reused
#vm: needs remapd remapctl
#vm: timeout 240
. /vm/lib.sh

VOL=vol0
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail manual-remap "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }

status() { remapctl status $VOL --json; }
num() { json_num "$(status)" "$1"; }
# The pool's used extents, per spare: "PATH:USED PATH:USED".
usage() {
    remapctl spare list $VOL --json | grep -o '"path":"[^"]*"\|"used":[0-9]*' | sed 's/^"[a-z]*"://; s/"//g' |
        paste -sd ' ' | awk '{ for (i = 1; i < NF; i += 2) printf "%s%s:%s", (i > 1 ? " " : ""), $i, $(i + 1); print "" }'
}

if ! out=$(remapctl create --in-place $VOL --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail manual-remap "create: $out"
    exit 1
fi
dd if=/dev/urandom of=/dev/mapper/$VOL bs=1M count=64 oflag=direct status=none
dd if=/dev/mapper/$VOL of=/tmp/golden bs=1M iflag=direct status=none

# --- chunk 10000 (sectors 80000-80007) moves to the pool by hand
C=10000
LBA=$((C * 8))
if out=$(remapctl remap add $VOL $LBA 2>&1); then
    sp=$(remap_field $C spare)
    ss=$(remap_field $C spare_sector)
    expect_eq manual-remap remaps 1 "$(num remaps)" &&
        expect_eq manual-remap "first-fit extent" "$sp1 16384" "$sp $ss" &&
        pass manual-remap "chunk $C on $sp at sector $ss"
else
    fail manual-remap "$out"
    exit 1
fi
info "pool before: $(usage)"

# --- sector 3 of that extent goes bad on the spare; a read through the volume fails there
bad=$((ss + 3))
nullb bad add "$sp" "$bad-$bad"
dio-read /dev/mapper/$VOL $LBA 8 2>/dev/null && info "read of chunk $C did not fail"
n=0
while [ "$(remap_field $C spare_sector)" = "$ss" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
sp_new=$(remap_field $C spare)
ss_new=$(remap_field $C spare_sector)
if [ "$sp_new $ss_new" != "$sp $ss" ] && [ -n "$ss_new" ]; then
    expect_eq spare-error-remapped remaps 1 "$(num remaps)" &&
        pass spare-error-remapped "chunk $C moved from $sp:$ss to $sp_new:$ss_new ($(grep -c 'chunk remapped' /tmp/remapd.log) remaps logged)"
else
    fail spare-error-remapped "chunk $C still at $sp:$ss after 30 s; log: $(grep -i 'error\|remap' /tmp/remapd.log | tail -3 | tr '\n' ' ')"
fi

# --- its readable sectors read back identical, one by one; the rest of the volume too
ok=1
s=$LBA
while [ $s -lt $((LBA + 8)) ]; do
    dd if=/tmp/golden of=/tmp/want bs=512 skip=$s count=1 status=none
    if [ $s = $((LBA + 3)) ]; then
        dio-read /dev/mapper/$VOL $s 1 /tmp/got 2>/dev/null && { fail data-identical "sector $s (bad on the spare) read"; ok=0; }
    elif ! dio-read /dev/mapper/$VOL $s 1 /tmp/got 2>/dev/null || ! cmp -s /tmp/want /tmp/got; then
        fail data-identical "sector $s fails or differs"
        ok=0
    fi
    s=$((s + 1))
done
dd if=/dev/mapper/$VOL of=/tmp/after bs=4096 iflag=direct conv=noerror,sync status=none 2>/dev/null
diffs=$(cmp -l /tmp/golden /tmp/after 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq | tr '\n' ' ')
expect_eq data-identical "4 KiB blocks that differ" "$C " "$diffs" && [ $ok = 1 ] &&
    pass data-identical "7 readable sectors of chunk $C identical, the rest of the volume identical"

p=$(remapctl pending $VOL --json)
expect_eq pending-exact "pending count" 1 "$(num pending)" &&
    expect_eq pending-exact "pending lba" $((LBA + 3)) "$(json_num "$p" lba)" &&
    expect_eq pending-exact "pending_blocks of chunk $C" 1 "$(remap_field $C pending_blocks)" &&
    pass pending-exact "$p"

# --- the old extent is released: one extent used in the whole pool, the new one
u=$(usage)
if [ "$sp_new" = "$sp1" ]; then want="$sp1:1 $sp2:0"; else want="$sp1:0 $sp2:1"; fi
expect_eq old-extent-released "used per spare" "$want" "$u" &&
    expect_eq old-extent-released "extents owned" "$ss_new" "$(remapctl remap list $VOL --json | grep -o '"spare_sector":[0-9]*' | tr -dc '0-9')" &&
    pass old-extent-released "$u; pool available $(json_num "$(status)" available) of $(json_num "$(status)" total)"

# --- the next remap must not land on the extent with the bad sector, and must succeed
C2=12000
if out=$(remapctl remap add $VOL $((C2 * 8)) 2>&1); then
    sp2n=$(remap_field $C2 spare)
    ss2n=$(remap_field $C2 spare_sector)
    if [ "$sp2n" = "$sp" ] && [ "$ss2n" = "$ss" ]; then
        fail bad-extent-not-reused "chunk $C2 was put on the extent with the bad sector ($sp:$ss)"
    else
        dd if=/tmp/golden of=/tmp/want bs=512 skip=$((C2 * 8)) count=8 status=none
        dio-read /dev/mapper/$VOL $((C2 * 8)) 8 /tmp/got &&
            cmp -s /tmp/want /tmp/got &&
            pass bad-extent-not-reused "chunk $C2 on $sp2n:$ss2n" ||
            fail bad-extent-not-reused "chunk $C2 on $sp2n:$ss2n does not read back"
    fi
else
    out2=$(remapctl remap add $VOL $((C2 * 8)) 2>&1)
    fail bad-extent-not-reused "remap add of chunk $C2 failed: $out; again: $out2; remaps $(num remaps)"
fi
info "pool after: $(usage)"
# What that means for automatic remaps: a bad sector on the main disk, read through the volume.
nullb bad add "$main" 104003-104003
dio-read /dev/mapper/$VOL 104000 8 2>/dev/null
sleep 3
info "automatic remap of chunk 13000 afterwards: remaps $(num remaps), log: $(grep 'remap failed' /tmp/remapd.log | tail -1)"

remapctl stop $VOL >/dev/null
kill -TERM $agent
wait $agent
exit 0
