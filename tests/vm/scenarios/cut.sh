#!/bin/sh
# Long region tables cut in two: with remapd told to cut past 16 segments, scattered remaps in
# one region cut it again and again; every region device's table stays within the bound, the
# volume reads back identical, the volume's table names one group device for region 0 however
# many pieces it was cut into, and a fresh assembly builds the very same devices and tables.
# Then remapd aborts at each step of a cut (REMAP_CRASH_AT: the new part's device made; the
# group's table, or at a first cut the volume's, through it; the cut committed); a restarted
# remapd adopts the volume, which
# reads back identical, with nothing suspended or prepared left, and its live tables are what
# a fresh assembly builds.
#vm: cases setup cuts-bounded readable-identical fresh-assembly-same after-region-device after-cut-swap after-cut-commit group-after-cut-swap
#vm: needs remapd remapctl
#vm: timeout 900
. /vm/lib.sh

VOL=vol0
DEV=/dev/mapper/$VOL
BOUND=16
export REMAPD_REGION_SEGMENTS=$BOUND

main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

agent="" log="" starts=0
status() { timeout 60 remapctl status "$VOL" --json 2>/dev/null; }
# The most lines any region device's table has.
longest() {
    for d in $(dmsetup ls | awk '{ print $1 }' | grep "^$VOL-remap-r"); do dmsetup table "$d" | wc -l; done | sort -n | tail -1
}
same_data() { dd if="$DEV" bs=1M iflag=direct status=none | cmp -s - /tmp/golden; }
# fresh_tables: the tables a fresh assembly builds (the volume stopped, every device removed),
# into /tmp/fresh (empty when it failed). Not in a subshell: the agent it starts stays ours.
fresh_tables() {
    : >/tmp/fresh
    stop_agent
    dmsetup remove "$VOL"
    for d in $(dmsetup ls | awk '{ print $1 }' | grep "^$VOL-remap-"); do dmsetup remove "$d"; done
    start_agent && grep -q "assembled (created)" "$log" && dm_tables >/tmp/fresh
}
# remap_chunks C...: one request per chunk (each a batch of its own)
dev_of() { # NAME: its major:minor
    dmsetup info -c --noheadings -o major,minor --separator : "$1" | tr -d ' '
}

remap_chunks() {
    for c in "$@"; do
        timeout 60 remapctl remap add "$VOL" $((c * 8)) --count 8 >/tmp/add.out 2>&1 || return 1
    done
}

start_agent || { fail setup "remapd not ready: $(tail -5 "$log")"; exit 1; }
if ! out=$(timeout 120 remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail setup "create: $out"
    exit 1
fi
dd if=/dev/urandom of="$DEV" bs=1M count=64 oflag=direct status=none
dd if="$DEV" of=/tmp/golden bs=1M iflag=direct status=none
pass setup "4 regions of 16 MiB, cut past $BOUND segments"

# --- 24 scattered remaps in region 0, 2 segments each
chunks=""
k=0
while [ $k -lt 24 ]; do
    chunks="$chunks $((100 + k * 150))"
    k=$((k + 1))
done
# shellcheck disable=SC2086
if remap_chunks $chunks; then
    st=$(status)
    regions=$(json_num "$st" regions)
    devs=$(dmsetup ls | grep -c "^$VOL-remap-r")
    long=$(longest)
    expect_eq cuts-bounded remaps 24 "$(json_num "$st" remaps)" &&
        { [ "$regions" -gt 5 ] || { fail cuts-bounded "only $regions regions after 24 scattered remaps in one"; false; }; } &&
        expect_eq cuts-bounded "region devices (one per region of region 0's parts)" $((regions - 3)) "$devs" &&
        { [ "$long" -le $BOUND ] || { fail cuts-bounded "a region table of $long lines"; false; }; } &&
        { grep -q "cut in two" "$log" || { fail cuts-bounded "no cut logged"; false; }; } &&
        { [ "$(dmsetup table "$VOL" | wc -l)" -le 4 ] && dmsetup table "$VOL" | grep -q "^0 32768 linear $(dev_of "$VOL-remap-g0000") 0$" ||
            { fail cuts-bounded "the volume does not go through one group for region 0: $(dmsetup table "$VOL" | head -3 | tr '\n' ';')"; false; }; } &&
        pass cuts-bounded "$regions regions, $devs region devices, longest region table $long lines, volume table $(dmsetup table "$VOL" | wc -l) lines"
else
    fail cuts-bounded "remap add: $(cat /tmp/add.out)"
fi
if same_data; then pass readable-identical "64 MiB"; else fail readable-identical "the volume differs from what was written"; fi
live=$(dm_tables)
fresh_tables
fresh=$(cat /tmp/fresh)
if [ -n "$fresh" ] && [ "$live" = "$fresh" ] && same_data; then
    pass fresh-assembly-same "$(printf '%s\n' "$fresh" | wc -l) table lines"
else
    printf '%s\n' "$live" >/tmp/t1
    printf '%s\n' "$fresh" >/tmp/t2
    fail fresh-assembly-same "$(diff /tmp/t1 /tmp/t2 | grep '^[-+][^-+]' | head -6 | tr '\n' ';')"
fi

# --- a crash at each step of a cut, each in a region of its own (1, 2, 3), which has its
# device already (its first remap made by a remapd that does not crash)
# What adoption must have put right after each: the new part's device (made, never committed)
# removed; the same with the volume's table going through it swapped back; the first part's
# table, still over the whole former span after the commit, shortened.
expect_notes() { # CRASH_POINT: one phrase a line
    case "$1" in
    after-region-device) echo "not a region of" ;;
    after-cut-swap) printf '%s\n' "not a region of" "went through other devices" ;;
    after-cut-commit) echo "shortened" ;;
    esac
}
# The last trial crashes a cut in region 0, which has its group already: what adoption puts
# back is the group's table, not the volume's.
for trial in "after-region-device 1" "after-cut-swap 2" "after-cut-commit 3" "after-cut-swap 0"; do
    # shellcheck disable=SC2086
    set -- $trial
    p=$1 region=$2 case=$1
    [ "$region" = 0 ] && case=group-$1
    : >/tmp/why
    base=$((region * 4096))
    remap_chunks $((base + 50)) || echo "first remap in region $region: $(cat /tmp/add.out)" >>/tmp/why
    stop_agent
    start_agent "$p" || echo "remapd (crash at $p) not ready" >>/tmp/why
    k=1
    while [ $k -le 20 ] && kill -0 "$agent" 2>/dev/null; do
        remap_chunks $((base + 50 + k * 150)) || break
        k=$((k + 1))
    done
    n=0
    while kill -0 "$agent" 2>/dev/null && [ $n -lt 300 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    if kill -0 "$agent" 2>/dev/null; then
        echo "remapd did not stop at $p after $k remaps" >>/tmp/why
        kill -KILL "$agent"
    fi
    wait "$agent"
    rc=$?
    [ $rc = 134 ] || echo "remapd exited with $rc, not an abort (134)" >>/tmp/why
    grep -q "REMAP_CRASH_AT=$p: aborting" "$log" || echo "no crash message in the log" >>/tmp/why
    start_agent || echo "restarted remapd not ready: $(tail -3 "$log" | tr '\n' ' ')" >>/tmp/why
    grep -q "assembled (adopted)" "$log" || echo "not adopted: $(grep -E 'assembled|not assembled|refus' "$log" | head -3 | tr '\n' ' ')" >>/tmp/why
    dmsetup info 2>/dev/null | grep -q "INACTIVE" && echo "inactive tables left" >>/tmp/why
    dmsetup info 2>/dev/null | grep -q "SUSPENDED" && echo "devices left suspended" >>/tmp/why
    same_data || echo "the volume differs from what was written after the restart" >>/tmp/why
    notes=$(grep -oE "shortened|not a region of|went through other devices" "$log" | sort -u | tr '\n' ';')
    if [ "$region" = 0 ] && ! grep -q "$VOL-remap-g0000: its table went through other devices" "$log"; then
        echo "adoption did not put the group's table back" >>/tmp/why
    fi
    expect_notes "$p" >/tmp/want
    while IFS= read -r want; do
        case "$notes" in *"$want"*) ;; *) echo "adoption did not note '$want' (noted: $notes)" >>/tmp/why ;; esac
    done </tmp/want
    long=$(longest)
    live=$(dm_tables)
    fresh_tables
    fresh=$(cat /tmp/fresh)
    if [ -z "$fresh" ] || [ "$live" != "$fresh" ]; then
        printf '%s\n' "$live" >/tmp/t1
        printf '%s\n' "$fresh" >/tmp/t2
        echo "live tables differ from a fresh assembly: $(diff /tmp/t1 /tmp/t2 | grep '^[-+][^-+]' | head -6 | tr '\n' ';')" >>/tmp/why
    fi
    same_data || echo "the volume differs after a fresh assembly" >>/tmp/why
    if [ -s /tmp/why ]; then
        fail "$case" "$(head -4 /tmp/why | tr '\n' ';')"
    else
        pass "$case" "crashed at remap $k of region $region; adoption: $notes longest region table $long lines"
    fi
done
stop_agent
