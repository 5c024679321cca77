#!/bin/sh
# The remap engine on real device-mapper: a volume over a null_blk disk whose blocks go bad;
# the agent moves each failing chunk to the spare pool, every block that was readable reads
# back identical, unreadable blocks never read as other data, and a rewrite brings them back
# (where dm-flakey has error_reads).
#vm: cases create regions-hidden auto-remap readable-identical pending-fail-reads pending-rewrite manual-remap spare-add spare-remove-busy spare-remove-empty stop
#vm: needs remapd remapctl
#vm: timeout 420
. /vm/lib.sh

VOL=vol0
MIB=1048576
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)
sp3=$(nullb create --size 24)

remapd --socket /run/remap/remapd.sock >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail create "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }

status() { remapctl status "$VOL" --json; }
num() { json_num "$(status)" "$1"; }

# --- create
if out=$(remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1) &&
    [ -b "/dev/mapper/$VOL" ]; then
    st=$(status)
    expect_eq create remaps 0 "$(json_num "$st" remaps)" &&
        expect_eq create size "$((64 * MIB))" "$(json_num "$st" size_bytes)" &&
        expect_eq create regions 4 "$(json_num "$st" regions)" &&
        pass create
else
    fail create "$out"
    exit 1
fi

# --- region devices: none while nothing is remapped (one layer: the volume maps the main);
# a region's first remap gives it a hidden, recognisable device (checked after the remaps)
t0=$(dmsetup table "$VOL" | wc -l)
r0=$(dmsetup ls | grep -c "^$VOL-remap-r")
first_table=$(dmsetup table "$VOL" | tr '\n' ';')

# Known data everywhere, then a golden copy to compare against.
dd if=/dev/urandom of="/dev/mapper/$VOL" bs=1M count=64 oflag=direct status=none
dd if="/dev/mapper/$VOL" of=/tmp/golden bs=1M iflag=direct status=none

# --- automatic remap: single bad sectors in four regions and a fully bad chunk
bad="1001 40003 70000 100000 100001 120000 120001 120002 120003 120004 120005 120006 120007"
for s in 1001-1001 40003-40003 70000-70000 100000-100001 120000-120007; do nullb bad add "$main" "$s"; done
chunks="125 5000 8750 12500 15000"
for c in $chunks; do
    dio-read "/dev/mapper/$VOL" $((c * 8)) 8 2>/dev/null && info "read of chunk $c did not fail"
done
n=0
while [ "$(num remaps)" != 5 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
expect_eq auto-remap remaps 5 "$(num remaps)" &&
    expect_eq auto-remap "pending blocks" 13 "$(num pending)" &&
    pass auto-remap "$(grep -c 'chunk remapped' /tmp/remapd.log) remaps logged"
t=$(dmsetup table "$VOL" | wc -l)
r=$(dmsetup ls | grep -c "^$VOL-remap-r")
expect_eq regions-hidden "volume table lines at creation" 1 "$t0" &&
    expect_eq regions-hidden "region devices at creation" 0 "$r0" &&
    expect_eq regions-hidden "volume table lines with a remap in every region" 4 "$t" &&
    expect_eq regions-hidden "region devices with a remap in every region" 4 "$r" &&
    pass regions-hidden "at creation: $first_table after: $(dmsetup table "$VOL" | tr '\n' ';')"

mode=$(json_str "$(status)" pending_mode)
is_bad() { case " $bad " in *" $1 "*) return 0 ;; esac; return 1; }

# --- every readable block of the moved chunks reads back identical, one block at a time
ok=1
for c in $chunks; do
    i=0
    while [ $i -lt 8 ]; do
        s=$((c * 8 + i))
        if ! is_bad $s; then
            dd if=/tmp/golden of=/tmp/want bs=512 skip=$s count=1 status=none
            if ! dio-read "/dev/mapper/$VOL" $s 1 /tmp/got 2>/dev/null || ! cmp -s /tmp/want /tmp/got; then
                fail readable-identical "sector $s (chunk $c) differs or fails"
                ok=0
            fi
        fi
        i=$((i + 1))
    done
done
# ... and so does the rest of the volume (4 KiB reads: a chunk with an unreadable block reads
# as zeros in this copy; its readable blocks were checked one by one above).
dd if="/dev/mapper/$VOL" of=/tmp/after bs=4096 iflag=direct conv=noerror,sync status=none 2>/dev/null
cmp -l /tmp/golden /tmp/after 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq >/tmp/diff
for c in $(cat /tmp/diff); do
    case " $chunks " in *" $c "*) ;; *) fail readable-identical "chunk $c differs from what was written"; ok=0 ;; esac
done
[ $ok = 1 ] && pass readable-identical "$(wc -l </tmp/diff) chunks differ, all holding unreadable blocks"

# --- unreadable blocks never read as other data
case "$mode" in
error-reads | error)
    ok=1
    for s in $bad; do
        dio-read "/dev/mapper/$VOL" "$s" 1 2>/dev/null && { fail pending-fail-reads "sector $s read"; ok=0; }
    done
    [ $ok = 1 ] && pass pending-fail-reads "mode $mode: 13 of 13 fail" ;;
zero) pass pending-fail-reads "mode zero (chosen): unreadable blocks read as zeros" ;;
*) fail pending-fail-reads "unknown mode $mode" ;;
esac

# --- rewrite of a pending block
if [ "$mode" = error-reads ]; then
    head -c 512 /dev/urandom >/tmp/new
    dio-write "/dev/mapper/$VOL" 1001 1 /tmp/new
    n=0
    while [ "$(num pending)" != 12 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    if dio-read "/dev/mapper/$VOL" 1001 1 /tmp/got 2>/dev/null && cmp -s /tmp/new /tmp/got; then
        expect_eq pending-rewrite "pending after rewrite" 12 "$(num pending)" && pass pending-rewrite
    else
        fail pending-rewrite "sector 1001 not readable with the new data (pending $(num pending))"
    fi
else
    skip pending-rewrite "kernel $VM_KERNEL has no dm-flakey error_reads: policy $mode applies"
fi

# --- manual remap of healthy chunks keeps their data
if remapctl remap add "$VOL" 80000 --count 16 >/tmp/out 2>&1; then
    dd if=/tmp/golden of=/tmp/want bs=512 skip=80000 count=16 status=none
    dio-read "/dev/mapper/$VOL" 80000 16 /tmp/got
    expect_eq manual-remap remaps 7 "$(num remaps)" &&
        { cmp -s /tmp/want /tmp/got || fail manual-remap "data changed"; } &&
        pass manual-remap "$(remapctl remap list "$VOL" | wc -l) lines in remap list"
else
    fail manual-remap "$(cat /tmp/out)"
fi

# --- spares
before=$(status)
if remapctl spare add "$VOL" "$sp3" >/dev/null; then
    expect_eq spare-add devices 3 "$(remapctl spare list "$VOL" --json | grep -o '"slot"' | wc -l)" && pass spare-add
else
    fail spare-add "spare add failed"
fi
st1=$(status)
if remapctl spare remove "$VOL" "$sp1" 2>/tmp/err; then
    fail spare-remove-busy "removed a spare holding extents"
else
    rc=$?
    expect_eq spare-remove-busy "exit code" 4 "$rc" &&
        expect_eq spare-remove-busy "status unchanged" "$st1" "$(status)" &&
        pass spare-remove-busy "$(cat /tmp/err)"
fi
if remapctl spare remove "$VOL" "$sp3" >/dev/null; then
    expect_eq spare-remove-empty devices 2 "$(remapctl spare list "$VOL" --json | grep -o '"slot"' | wc -l)" &&
        pass spare-remove-empty
else
    fail spare-remove-empty "could not remove the empty spare"
fi
info "status before spare ops: $before"

# --- stop
if remapctl stop "$VOL" >/dev/null && [ ! -e "/dev/mapper/$VOL" ] &&
    [ "$(dmsetup ls | grep -c "^$VOL")" = 0 ]; then
    pass stop
else
    fail stop "$(dmsetup ls)"
fi
remapctl status --json | grep -q "$VOL" && fail stop "still in status"
kill -TERM $agent
wait $agent
exit 0
