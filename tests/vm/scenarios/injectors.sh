#!/bin/sh
# The kernel parts remap stands on, checked without its engine: the fault injectors against the
# kernel's own block_rq_error tracepoint (exact sector, size and errno for each), and the
# device-mapper boundary (dmsmoke: the kernel's answers, errors and holders as remap reads them).
#vm: cases nullb-eio nullb-runtime-badblocks scsi-enodata blkdebug-eio dm-boundary
#vm: needs dmsmoke
#vm: disk bad 16M inject=read_aio:5:1000
#vm: timeout 240
. /vm/lib.sh

T=/sys/kernel/tracing
echo 1 >$T/events/block/block_rq_error/enable

# traced CASE DEV SECTOR NR ERRNO: the trace holds "MAJ,MIN ... SECTOR + NR ... [-ERRNO]".
traced() {
    mm=$(tr ':' ',' <"/sys/block/${2##*/}/dev")
    if grep -Eq "block_rq_error: $mm R[A-Z]* .* $3 \+ $4 .*\[-$5\]" $T/trace; then
        pass "$1" "$mm sector $3 + $4 errno $5"
    else
        fail "$1" "no block_rq_error for $mm sector $3 + $4 [-$5] in: $(grep block_rq_error $T/trace | tr -s ' ' | tail -3)"
    fi
}

: >$T/trace
nb=$(nullb create --size 16 --bad 2048-2055)
if dio-read "$nb" 2048 8 2>/dev/null; then fail nullb-eio "read of a bad block succeeded"; else traced nullb-eio "$nb" 2048 8 5; fi

# Bad blocks move at runtime: a new one fails, a removed one reads again.
nullb bad add "$nb" 4096-4103
nullb bad del "$nb" 2048-2055
if dio-read "$nb" 2048 8 && ! dio-read "$nb" 4096 8 2>/dev/null; then
    pass nullb-runtime-badblocks
else
    fail nullb-runtime-badblocks "after del 2048/add 4096: $(nullb bad list "$nb")"
fi

: >$T/trace
sd=$(scsi-debug create --size 16 --bad 4096 8)
if dio-read "$sd" 4096 8 2>/dev/null; then fail scsi-enodata "read of a medium error succeeded"; else traced scsi-enodata "$sd" 4096 8 61; fi

: >$T/trace
vd=$(vmdisk bad)
if dio-read "$vd" 1000 8 2>/dev/null; then fail blkdebug-eio "read of sector 1000 succeeded"; else traced blkdebug-eio "$vd" 1000 8 5; fi

# Every check dmsmoke makes on a scratch device it overwrites: one PASS or FAIL line each.
scratch=$(nullb create --size 16)
if dmsmoke "$scratch" >/tmp/smoke 2>&1 && grep -q '^RESULT PASS' /tmp/smoke; then
    pass dm-boundary "$(grep -c '^PASS' /tmp/smoke) checks"
else
    fail dm-boundary "$(grep -E '^(FAIL|RESULT)' /tmp/smoke | head -5 | tr '\n' ' ')"
fi
exit 0
