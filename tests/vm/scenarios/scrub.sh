#!/bin/sh
# Scrub: remapd reads the whole of a volume's data in the background, and a block that went
# bad where nobody reads (a latent error) is found and its chunk remapped before anyone needs
# it. The scrub's position survives a restart of remapd, and no readable data changes. A spare
# wears too: a remapped chunk is read on its spare, where a block that went bad moves it again.
#vm: cases scrub-finds-latent scrub-status scrub-resume data-identical scrub-reads-spares
#vm: needs remapd remapctl
#vm: timeout 600
. /vm/lib.sh

VOL=vol
MIB=1048576
STATE=/tmp/remap-state
CURSOR=$STATE/scrub/$VOL.json
# A sector in chunk 12500 (at 48.8 MiB): nothing reads or writes it once the data is down.
LATENT=100003
LATENT_CHUNK=12500

main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

# start_agent N: remapd in the background (log /tmp/remapdN.log); sets $agent.
start_agent() {
    remapd --state-dir "$STATE" >"/tmp/remapd$1.out" 2>"/tmp/remapd$1.log" &
    agent=$!
    wait_for "/tmp/remapd$1.log" "remapd ready" 90
}

scrub_status() { remapctl scrub "$VOL" --status --json; }

# wait_scrub_done SECONDS: polls the status until the scrub is done.
wait_scrub_done() {
    _n=$(($1 * 2))
    while [ "$_n" -gt 0 ]; do
        [ "$(json_str "$(scrub_status)" state)" = done ] && return 0
        sleep 0.5
        _n=$((_n - 1))
    done
    return 1
}

if ! start_agent 1; then
    fail scrub-finds-latent "remapd not ready: $(tail -5 /tmp/remapd1.log)"
    exit 1
fi
if ! out=$(remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1); then
    fail scrub-finds-latent "create: $out"
    exit 1
fi
size=$(json_num "$(remapctl status "$VOL" --json)" size_bytes)

# Known data everywhere and a golden copy; then the block goes bad behind everyone's back.
dd if=/dev/urandom of="/dev/mapper/$VOL" bs=1M count=64 oflag=direct status=none
dd if="/dev/mapper/$VOL" of=/tmp/golden bs=1M iflag=direct status=none
nullb bad add "$main" "$LATENT-$LATENT"
expect_eq scrub-finds-latent "remaps before the scrub" 0 "$(json_num "$(remapctl status "$VOL" --json)" remaps)"

# --- a scrub at 50 MiB/s finds the latent block and its chunk moves
if ! out=$(remapctl scrub "$VOL" --rate 50 2>&1); then
    fail scrub-finds-latent "scrub start: $out"
elif ! wait_scrub_done 240; then
    fail scrub-finds-latent "not done after 240 s: $(scrub_status)"
else
    n=0
    until remapctl remap list "$VOL" --json | grep -q "\"chunk\":$LATENT_CHUNK[,}]" || [ $n -ge 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    list=$(remapctl remap list "$VOL" --json)
    if printf '%s' "$list" | grep -q "\"chunk\":$LATENT_CHUNK[,}]"; then
        pass scrub-finds-latent "$(grep -c 'chunk remapped' /tmp/remapd1.log) remaps logged; $(remapctl status "$VOL" --json | sed -n 's/.*\("remaps":[0-9]*\).*/\1/p')"
    else
        fail scrub-finds-latent "chunk $LATENT_CHUNK not in the remap list: $list"
    fi
fi

# --- the status says done, all of it, one bad chunk
st=$(scrub_status)
info "status after the scrub: $st"
expect_eq scrub-status state done "$(json_str "$st" state)" &&
    expect_eq scrub-status position "$size" "$(json_num "$st" position_bytes)" &&
    expect_eq scrub-status total "$size" "$(json_num "$st" total_bytes)" &&
    expect_eq scrub-status "bad chunks" 1 "$(json_num "$st" bad_chunks)" &&
    expect_eq scrub-status "text status" 1 "$(remapctl scrub "$VOL" --status | grep -c 'scrub done')" &&
    pass scrub-status "$(remapctl scrub "$VOL" --status)"

# --- resume: a slow scrub, remapd stopped midway after the cursor was saved, started again
resumed=0
if ! out=$(remapctl scrub "$VOL" --restart --rate 1 2>&1); then
    fail scrub-resume "scrub start: $out"
else
    n=0 p1=0
    while [ $n -lt 600 ]; do
        p1=$(json_num "$(cat "$CURSOR" 2>/dev/null)" position_bytes)
        [ -n "$p1" ] && [ "$p1" -gt 0 ] && break
        sleep 0.1
        n=$((n + 1))
    done
    mode=$(stat -c %a "$CURSOR" 2>/dev/null)
    kill -TERM $agent
    wait $agent
    saved=$(cat "$CURSOR")
    p1=$(json_num "$saved" position_bytes)
    info "cursor after SIGTERM (mode $mode): $saved"
    if [ -z "$p1" ] || [ "$p1" -le 0 ] || [ "$p1" -ge "$size" ]; then
        fail scrub-resume "no position midway saved: $saved"
    elif [ "$(json_str "$saved" state)" != running ]; then
        fail scrub-resume "saved as $(json_str "$saved" state), not running"
    elif [ "$mode" != 600 ]; then
        fail scrub-resume "cursor file mode $mode, not 600"
    elif ! start_agent 2; then
        fail scrub-resume "remapd did not start again: $(tail -5 /tmp/remapd2.log)"
    else
        line=$(grep -m1 "resuming the scrub" /tmp/remapd2.log)
        from=$(printf '%s' "$line" | sed -n 's/.*position=\([0-9]*\).*/\1/p')
        st=$(scrub_status)
        p2=$(json_num "$st" position_bytes)
        # No limit from here, so the rest does not take a minute.
        remapctl scrub "$VOL" --rate 0 >/dev/null
        if [ -z "$line" ]; then
            fail scrub-resume "no 'resuming the scrub' in the log: $(tail -5 /tmp/remapd2.log)"
        elif [ "$from" != "$p1" ]; then
            fail scrub-resume "resumed from '$from', saved $p1"
        elif [ -z "$p2" ] || [ "$p2" -lt "$p1" ]; then
            fail scrub-resume "position $p2 after the restart, saved $p1"
        elif ! wait_scrub_done 240; then
            fail scrub-resume "not done after the restart: $(scrub_status)"
        else
            st=$(scrub_status)
            expect_eq scrub-resume "position at the end" "$size" "$(json_num "$st" position_bytes)" &&
                pass scrub-resume "saved at $p1 of $size, resumed from $from, done"
            resumed=1
        fi
    fi
fi
[ $resumed = 1 ] || info "remapd log: $(tail -20 /tmp/remapd2.log 2>/dev/null | tr '\n' '|')"

# --- every readable block reads as it was written
dd if="/dev/mapper/$VOL" of=/tmp/after bs=4096 iflag=direct conv=noerror,sync status=none 2>/dev/null
cmp -l /tmp/golden /tmp/after 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq >/tmp/diff
ok=1
for c in $(cat /tmp/diff); do
    [ "$c" = $LATENT_CHUNK ] || { fail data-identical "chunk $c differs from what was written"; ok=0; }
done
# The chunk with the latent block: each of its other sectors alone.
s=$((LATENT_CHUNK * 8))
while [ $s -lt $((LATENT_CHUNK * 8 + 8)) ]; do
    if [ $s != $LATENT ]; then
        dd if=/tmp/golden of=/tmp/want bs=512 skip=$s count=1 status=none
        if ! dio-read "/dev/mapper/$VOL" $s 1 /tmp/got 2>/dev/null || ! cmp -s /tmp/want /tmp/got; then
            fail data-identical "sector $s of the remapped chunk differs or fails"
            ok=0
        fi
    fi
    s=$((s + 1))
done
# The unreadable sector fails reads (or, with --unreadable zero, reads as zeros): never as
# other data.
if dio-read "/dev/mapper/$VOL" $LATENT 1 /tmp/got 2>/dev/null && [ "$(tr -d '\000' </tmp/got | wc -c)" != 0 ]; then
    fail data-identical "the unreadable sector $LATENT reads as data"
    ok=0
fi
[ $ok = 1 ] && pass data-identical "$(wc -l </tmp/diff) chunk(s) differ in a 4 KiB read, all the one with the unreadable block"

# --- the remapped chunk's sector 5 goes bad on its spare, where nobody reads: a new pass of
# the scrub reads the chunk there (its main copy, with the latent block, never), and it moves
# again with its readable sectors
sp=$(remap_field $LATENT_CHUNK spare)
ss=$(remap_field $LATENT_CHUNK spare_sector)
nullb bad add "$sp" "$((ss + 5))-$((ss + 5))"
if [ -z "$ss" ] || ! out=$(remapctl scrub "$VOL" --restart --rate 0 2>&1); then
    fail scrub-reads-spares "chunk $LATENT_CHUNK at '$sp:$ss'; scrub start: $out"
elif ! wait_scrub_done 240; then
    fail scrub-reads-spares "not done after 240 s: $(scrub_status)"
else
    n=0
    while [ "$(remap_field $LATENT_CHUNK spare_sector)" = "$ss" ] && [ $n -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    sp_new=$(remap_field $LATENT_CHUNK spare)
    ss_new=$(remap_field $LATENT_CHUNK spare_sector)
    found=$(grep -c 'scrub found an unreadable block of a remapped chunk' /tmp/remapd2.log)
    ok=1
    for o in 0 1 2 4 6 7; do
        s=$((LATENT_CHUNK * 8 + o))
        dd if=/tmp/golden of=/tmp/want bs=512 skip=$s count=1 status=none
        if ! dio-read "/dev/mapper/$VOL" $s 1 /tmp/got 2>/dev/null || ! cmp -s /tmp/want /tmp/got; then
            fail scrub-reads-spares "sector $s of the chunk differs or fails after its move"
            ok=0
        fi
    done
    if [ "$sp_new:$ss_new" = "$sp:$ss" ] || [ -z "$ss_new" ]; then
        fail scrub-reads-spares "chunk $LATENT_CHUNK still at $sp:$ss; found $found; $(scrub_status)"
    elif [ $ok = 1 ]; then
        expect_eq scrub-reads-spares "reports of the scrub" 1 "$found" &&
            expect_eq scrub-reads-spares "bad chunks of this pass" 1 "$(json_num "$(scrub_status)" bad_chunks)" &&
            expect_eq scrub-reads-spares "pending blocks (the latent one and the spare's)" 2 "$(remap_field $LATENT_CHUNK pending_blocks)" &&
            pass scrub-reads-spares "chunk $LATENT_CHUNK moved from $sp:$ss to $sp_new:$ss_new, its 6 readable sectors identical"
    fi
fi

kill -TERM $agent 2>/dev/null
wait $agent 2>/dev/null
exit 0
