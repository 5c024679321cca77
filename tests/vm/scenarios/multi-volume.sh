#!/bin/sh
# Two volumes in one agent, each with its own main disk and spare pool. Bad sectors at the
# same sector numbers on both mains, then elsewhere on each: every error is attributed to the
# volume whose main failed (remap counts and chunks per volume), each volume's chunks land in
# its own pool only, the other volume's status stays byte-identical while one is remapping, and
# errors on both at once (one burst) are each handled in their own volume.
#vm: cases create a-only b-only both-at-once own-pools data-identical
#vm: needs remapd remapctl
#vm: timeout 240
. /vm/lib.sh

ma=$(nullb create --size 64)
a1=$(nullb create --size 24)
a2=$(nullb create --size 24)
mb=$(nullb create --size 32)
b1=$(nullb create --size 24)

remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail create "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }

status() { remapctl status "$1" --json; }
num() { json_num "$(status "$1")" "$2"; }
chunks() { remapctl remap list "$1" --json | grep -o '"chunk":[0-9]*' | tr -dc '0-9\n' | sort -n | paste -sd ' '; }
spares_used() { remapctl remap list "$1" --json | grep -o '"spare":"[^"]*"' | sed 's/.*:"//; s/"//' | sort -u | paste -sd ' '; }
pool_used() { remapctl spare list "$1" --json | grep -o '"used":[0-9]*' | tr -dc '0-9\n' | paste -sd ' '; }
wait_remaps() { # wait_remaps VOL N
    n=0
    while [ "$(num "$1" remaps)" != "$2" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
}
bad() { # bad DEV SECTOR...
    d=$1
    shift
    for s in "$@"; do nullb bad add "$d" "$s-$s"; done
}
trigger() { # trigger VOL SECTOR...: one failing 4 KiB read per sector's chunk
    v=$1
    shift
    for s in "$@"; do dio-read "/dev/mapper/$v" $((s / 8 * 8)) 8 2>/dev/null && info "read of $v sector $s did not fail"; done
}

if out=$(remapctl create --in-place va --main "$ma" --spare "$a1" --spare "$a2" --region-size 16MiB 2>&1) &&
    out=$(remapctl create --in-place vb --main "$mb" --spare "$b1" --region-size 16MiB 2>&1); then
    expect_eq create "volumes" 2 "$(remapctl status --json | grep -o '"uuid"' | wc -l)" && pass create
else
    fail create "$out"
    exit 1
fi
dd if=/dev/urandom of=/dev/mapper/va bs=1M count=64 oflag=direct status=none
dd if=/dev/urandom of=/dev/mapper/vb bs=1M count=32 oflag=direct status=none
dd if=/dev/mapper/va of=/tmp/golden-a bs=1M iflag=direct status=none
dd if=/dev/mapper/vb of=/tmp/golden-b bs=1M iflag=direct status=none

# --- errors on va's main only (sector 2001 is also where vb will fail later)
sb=$(status vb)
bad "$ma" 2001 50000 90000
trigger va 2001 50000 90000
wait_remaps va 3
expect_eq a-only "va remaps" 3 "$(num va remaps)" &&
    expect_eq a-only "va chunks" "250 6250 11250" "$(chunks va)" &&
    expect_eq a-only "va pending" 3 "$(num va pending)" &&
    expect_eq a-only "vb status unchanged" "$sb" "$(status vb)" &&
    pass a-only

# --- errors on vb's main only, at the same sector numbers as va's first one
sa=$(status va)
bad "$mb" 2001 40000
trigger vb 2001 40000
wait_remaps vb 2
expect_eq b-only "vb remaps" 2 "$(num vb remaps)" &&
    expect_eq b-only "vb chunks" "250 5000" "$(chunks vb)" &&
    expect_eq b-only "vb pending" 2 "$(num vb pending)" &&
    expect_eq b-only "va status unchanged" "$sa" "$(status va)" &&
    pass b-only

# --- one burst on both: same sector number on both mains plus one each, read concurrently
bad "$ma" 30001 120000
bad "$mb" 30001 60000
trigger va 30001 120000 &
r1=$!
trigger vb 30001 60000 &
r2=$!
wait $r1 $r2
wait_remaps va 5
wait_remaps vb 4
expect_eq both-at-once "va remaps" 5 "$(num va remaps)" &&
    expect_eq both-at-once "vb remaps" 4 "$(num vb remaps)" &&
    expect_eq both-at-once "va chunks" "250 3750 6250 11250 15000" "$(chunks va)" &&
    expect_eq both-at-once "vb chunks" "250 3750 5000 7500" "$(chunks vb)" &&
    expect_eq both-at-once "va pending" 5 "$(num va pending)" &&
    expect_eq both-at-once "vb pending" 4 "$(num vb pending)" &&
    pass both-at-once "$(grep -c 'chunk remapped' /tmp/remapd.log) remaps logged"

# --- each volume's extents are in its own pool
expect_eq own-pools "va extents on (first-fit)" "$a1" "$(spares_used va)" &&
    expect_eq own-pools "vb extents on" "$b1" "$(spares_used vb)" &&
    expect_eq own-pools "va pool used (per spare)" "5 0" "$(pool_used va)" &&
    expect_eq own-pools "vb pool used" "4" "$(pool_used vb)" &&
    pass own-pools "va: $(spares_used va); vb: $(spares_used vb)"

# --- readable data identical in both (4 KiB blocks holding a bad sector are the only diffs)
ok=1
for v in va vb; do
    dd if=/dev/mapper/$v of=/tmp/after bs=4096 iflag=direct conv=noerror,sync status=none 2>/dev/null
    d=$(cmp -l /tmp/golden-${v#v} /tmp/after 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq | paste -sd ' ')
    expect_eq data-identical "$v blocks that differ" "$(chunks $v)" "$d" || ok=0
done
[ $ok = 1 ] && pass data-identical

remapctl stop va >/dev/null
remapctl stop vb >/dev/null
kill -TERM $agent
wait $agent
exit 0
