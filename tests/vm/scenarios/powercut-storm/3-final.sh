#!/bin/sh
# The final boot: assemble and verify once more; remaps were kept; a stop and a fresh
# assembly rebuild the same tables and the same data.
. /vm/scenario/_lib.sh

boot_start
st=$(status)
acks_by_storm=$(awk '$1 > 1' /tmp/acks | wc -l)
storm_boots=$(awk '$1 > 1' /tmp/acks | cut -d' ' -f1 | sort -u | wc -l)
if [ "$REMAPS" -gt 0 ] && [ "$acks_by_storm" -gt 0 ]; then
    pass remaps-kept "$REMAPS remaps, generation $GEN, $acks_by_storm acknowledged writes over $storm_boots storm boots"
else
    fail remaps-kept "remaps $REMAPS, acknowledged writes $acks_by_storm"
fi
line=$(timeout 60 remapctl remap list "$VOL" --json | grep -o "{[^}]*\"chunk\":$BAD_CHUNK,[^}]*}")
pend=$(json_num "$line" pending_blocks)
if [ -n "$line" ] && [ "${pend:-0}" -ge 1 ] && [ -n "$AUTO" ]; then
    pass auto-remap-kept "chunk $BAD_CHUNK remapped in boot $AUTO, still remapped with $pend pending block(s)"
else
    fail auto-remap-kept "chunk $BAD_CHUNK: ${line:-not remapped}; remapped in boot ${AUTO:-none}"
fi

# Stop, then assemble from the metadata alone: the same tables, the same blocks.
before=$(tables)
for b in $BLOCKS; do seqblock read "$DEV" "$b" 2>&1; done >/tmp/data.before
if timeout 60 remapctl stop "$VOL" >/tmp/out 2>&1 && [ "$(dmsetup ls)" = "No devices found" ] &&
    timeout 120 remapctl assemble "$VOL" >>/tmp/out 2>&1; then
    after=$(tables)
    for b in $BLOCKS; do seqblock read "$DEV" "$b" 2>&1; done >/tmp/data.after
    if [ "$before" = "$after" ] && cmp -s /tmp/data.before /tmp/data.after; then
        pass table-reassembles "$(printf '%s\n' "$after" | wc -l) table lines, 64 blocks identical"
    else
        printf '%s\n' "$before" >/tmp/t1
        printf '%s\n' "$after" >/tmp/t2
        fail table-reassembles "tables: $(diff /tmp/t1 /tmp/t2 | grep '^[-+][^-+]' | head -4 | tr '\n' ';') data: $(cmp /tmp/data.before /tmp/data.after)"
    fi
else
    fail table-reassembles "$(tr '\n' ' ' </tmp/out) $(dmsetup ls | tr '\n' ' ')"
fi
verify_acked acked-writes
kill -TERM $agent
wait $agent
exit 0
