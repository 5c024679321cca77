#!/bin/sh
# Crash points off the remap path: remapd aborts (REMAP_CRASH_AT) right after the metadata of
# a create, of a spare add, or of a pending block's rewrite is durable, before the tables follow.
# A restarted remapd must bring the volume up exactly as the metadata says: the created volume
# exists, the added spare is in the pool, the rewritten block reads the data written to it and
# is no longer pending; nothing is left suspended or half-loaded.
#vm: cases create-after-metadata spare-add-after-checkpoint pending-after-commit
#vm: needs remapd remapctl
#vm: timeout 400
. /vm/lib.sh

VOL=vol0
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)
sp3=$(nullb create --size 24)

starts=0
crashed() { # POINT: the agent aborted there
    wait "$agent"
    rc=$?
    [ $rc = 134 ] && grep -q "REMAP_CRASH_AT=$1: aborting" "$log"
}
status() { timeout 60 remapctl status "$VOL" --json 2>/dev/null; }
settled() { ! dmsetup info 2>/dev/null | grep -qE "SUSPENDED|INACTIVE"; }

# --- create: the metadata is written, the devices never made
start_agent create-after-metadata || { fail create-after-metadata "remapd not ready"; exit 1; }
timeout 60 remapctl create --in-place "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB >/tmp/out 2>&1
if crashed create-after-metadata && start_agent && st=$(status) && [ -b /dev/mapper/$VOL ] &&
    [ "$(json_num "$st" regions)" = 4 ] && settled; then
    pass create-after-metadata "the volume came up from its metadata: $(grep -m1 'assembled' "$log" | cut -c1-120)"
else
    fail create-after-metadata "rc $rc; $(tail -3 "$log" | tr '\n' ' '); $(cat /tmp/out)"
    exit 1
fi
dd if=/dev/urandom of=/dev/mapper/$VOL bs=1M count=64 oflag=direct status=none

# --- spare add: the checkpoint naming the new spare is durable
kill -TERM $agent
wait $agent
start_agent spare-add-after-checkpoint || { fail spare-add-after-checkpoint "remapd not ready"; exit 1; }
timeout 60 remapctl spare add "$VOL" "$sp3" >/tmp/out 2>&1
if crashed spare-add-after-checkpoint && start_agent && st=$(status) &&
    printf '%s' "$st" | grep -q "\"path\":\"$sp3\"" && settled; then
    pass spare-add-after-checkpoint "the pool has $sp3 after the restart"
else
    fail spare-add-after-checkpoint "rc $rc; status: $(printf '%s' "$st" | cut -c1-300); $(tail -3 "$log" | tr '\n' ' ')"
fi

# --- a pending block rewritten: committed as data, the crash comes before the resume
mode=$(json_str "$(status)" pending_mode)
if [ "$mode" != error-reads ]; then
    # Pending blocks refuse writes under the policy: there is no rewrite to crash in.
    skip pending-after-commit "kernel $VM_KERNEL has no dm-flakey error_reads: policy $mode applies"
    kill -TERM $agent
    wait $agent
    exit 0
fi
nullb bad add "$main" 1001-1001
dio-read /dev/mapper/$VOL 1000 8 2>/dev/null
n=0
while [ "$(json_num "$(status)" pending)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
kill -TERM $agent
wait $agent
start_agent pending-after-commit || { fail pending-after-commit "remapd not ready"; exit 1; }
head -c 512 /dev/urandom >/tmp/fresh
dio-write /dev/mapper/$VOL 1001 1 /tmp/fresh
n=0
while kill -0 $agent 2>/dev/null && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if crashed pending-after-commit && start_agent && [ "$(json_num "$(status)" pending)" = 0 ] &&
    dio-read /dev/mapper/$VOL 1001 1 /tmp/back 2>/dev/null && cmp -s /tmp/fresh /tmp/back && settled; then
    pass pending-after-commit "the rewritten block reads its data and is not pending; $(grep -c 'left suspended' "$log") region note(s)"
else
    fail pending-after-commit "rc $rc; pending $(json_num "$(status)" pending); $(cmp /tmp/fresh /tmp/back 2>&1); $(tail -3 "$log" | tr '\n' ' ')"
fi
kill -TERM $agent
wait $agent
exit 0
