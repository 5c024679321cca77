#!/bin/sh
# Checkpoints written in slices while the agent is idle. Rounds of 1,024 scattered remaps
# (the same chunks moved again each round) fill 3/4 of the journal ring; the idle agent then
# writes a checkpoint of the state a slice at a time and names it (its generation is the
# state's, below the volume's: a whole-state checkpoint takes a generation of its own, and
# the ring is short of the 7/8 that calls for one). The journal goes on after it; a
# restarted agent adopts the volume with nothing to put right, every byte as written.
#vm: cases setup three-quarter-ring sliced-checkpoint adopted-identical
#vm: needs remapd remapctl
#vm: timeout 900
. /vm/lib.sh

VOL=vol0
DEV=/dev/mapper/$VOL
main=$(nullb create --size 64)
sp1=$(nullb create --size 64)
sp2=$(nullb create --size 64)

agent="" log="" starts=0
status() { timeout 60 remapctl status "$VOL" --json 2>/dev/null; }
# sb_gen SLOT: the checkpoint generation superblock SLOT of the first spare names.
sb_gen() { dd if="$sp1" bs=4096 skip="$1" count=1 iflag=direct status=none | od -An -tu8 -j48 -N8 | tr -d ' '; }
newest_ckpt() {
    a=$(sb_gen 0) b=$(sb_gen 1)
    [ "${a:-0}" -gt "${b:-0}" ] && echo "$a" || echo "${b:-0}"
}

start_agent || { fail setup "remapd not ready: $(tail -5 "$log")"; exit 1; }
if ! out=$(timeout 120 remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail setup "create: $out"
    exit 1
fi
dd if=/dev/urandom of="$DEV" bs=1M count=64 oflag=direct status=none
st=$(status)
unit=$(json_num "$st" journal_unit)
pass setup "journal unit $unit, first checkpoint at generation $(newest_ckpt)"

# The ring is a quarter of the 8 MiB area: 2 MiB, 4,096 blocks of 512 bytes, each holding 14
# records; a round of 1,024 remaps is one commit of 74 blocks. 42 rounds pass 3/4 of the ring
# (3,072 blocks), not 7/8 (3,584).
lbas=$(seq 0 16 16368 | tr '\n' ' ')
ck0=$(newest_ckpt)
round=0 bad=""
while [ $round -lt 42 ]; do
    # shellcheck disable=SC2086
    timeout 120 remapctl remap add "$VOL" $lbas >/tmp/add.out 2>&1 || { bad="round $round: $(tail -2 /tmp/add.out)"; break; }
    round=$((round + 1))
done
st=$(status)
gen=$(json_num "$st" generation)
if [ -z "$bad" ] && [ "$gen" -gt 42 ]; then
    pass three-quarter-ring "$round rounds of 1,024 remaps, generation $gen, remaps $(json_num "$st" remaps)"
else
    fail three-quarter-ring "${bad:-generation $gen}"
fi

# Idle now: the checkpoint goes out in slices and is named.
k=0
while ! grep -q "checkpoint written in slices" "$log" && [ $k -lt 300 ]; do
    sleep 0.2
    k=$((k + 1))
done
ck=$(newest_ckpt)
line=$(grep "checkpoint written in slices" "$log" | tail -1 | cut -c1-240)
if [ -n "$line" ] && [ "$ck" -gt "$ck0" ] && [ "$ck" -le "$gen" ]; then
    pass sliced-checkpoint "newest checkpoint generation $ck0 -> $ck (the state's; volume at $gen): $line"
else
    fail sliced-checkpoint "newest checkpoint $ck0 -> $ck, volume generation $gen; log: $(tail -3 "$log")"
fi

# The journal goes on after it; a restart adopts the volume as it is.
timeout 120 remapctl remap add "$VOL" 20000 >/dev/null 2>&1
dd if="$DEV" of=/tmp/golden bs=1M iflag=direct status=none
st=$(status)
want="$(json_num "$st" remaps) $(json_num "$st" generation)"
stop_agent
if start_agent && grep -q "assembled (adopted)" "$log"; then
    st=$(status)
    got="$(json_num "$st" remaps) $(json_num "$st" generation)"
    if [ "$got" = "$want" ] && dd if="$DEV" bs=1M iflag=direct status=none | cmp -s - /tmp/golden &&
        ! grep -q "put right\|stale\|damaged" "$log"; then
        pass adopted-identical "remaps and generation $got, every byte as written, no checkpoint needed"
    else
        fail adopted-identical "want '$want', got '$got'; $(grep -i "note\|stale\|damaged" "$log" | tail -2)"
    fi
else
    fail adopted-identical "not adopted: $(tail -3 "$log")"
fi
stop_agent
exit 0
