#!/bin/sh
# A storm boot: assemble, verify, then writes + remaps until a power cut at a random moment.
#vm: repeat 2 20
. /vm/scenario/_lib.sh

boot_start

# The failing sector: the first storm boot's read fails and the chunk moves (its failing
# block stays pending); once a boot saw it remapped (a durable AUTO record), every later boot
# must find it remapped.
if timeout 60 remapctl remap list "$VOL" --json | grep -q "\"chunk\":$BAD_CHUNK,"; then
    [ -n "$AUTO" ] || info "boot $VM_BOOT: chunk $BAD_CHUNK remapped but no boot recorded it"
elif [ -n "$AUTO" ]; then
    fail auto-remap-kept "boot $VM_BOOT: chunk $BAD_CHUNK, remapped in boot $AUTO, is not remapped any more"
else
    dio-read "$DEV" $BAD_SECTOR 1 2>/dev/null && info "boot $VM_BOOT: the read of sector $BAD_SECTOR did not fail"
    n=0
    until timeout 60 remapctl remap list "$VOL" --json | grep -q "\"chunk\":$BAD_CHUNK,"; do
        n=$((n + 1))
        [ $n -gt 60 ] && break
        sleep 0.5
    done
    if [ $n -le 60 ]; then
        record $AUTO_REC "AUTO $VM_BOOT"
        info "boot $VM_BOOT: chunk $BAD_CHUNK remapped automatically after a failed read"
    else
        fail auto-remap-kept "boot $VM_BOOT: chunk $BAD_CHUNK was not remapped after a failed read: $(grep -iE 'error|remap' /tmp/remapd.log | tail -3 | tr '\n' ' ')"
    fi
fi

# The writer: seqblock writes over the 64 blocks in a random order, each acknowledged by a
# durable record on the log disk once it returned 0.
cat >/tmp/writer.sh <<'W'
. /vm/scenario/_lib.sh
seq=$((VM_BOOT * 1000000)) r=$NEXT_ACK
while :; do
    for b in $(printf '%s\n' $BLOCKS | shuf); do
        seq=$((seq + 1))
        seqblock write "$DEV" "$b" "$seq" 2>>/tmp/writer.err || continue
        [ $r -lt $BOOT_REC ] && record $r "ACK $VM_BOOT $b $seq" && r=$((r + 1))
    done
done
W
# The storm: remaps of random chunks around the workload blocks (three chunks each, one
# request), chunks moving again when they already were.
cat >/tmp/storm.sh <<'S'
. /vm/scenario/_lib.sh
while :; do
    b=$(printf '%s\n' $BLOCKS | shuf -n 1)
    timeout 60 remapctl remap add "$VOL" $(((b - 1) * 8)) --count 24 >/dev/null 2>>/tmp/storm.err
done
S
NEXT_ACK=$NEXT_ACK sh /tmp/writer.sh &
sh /tmp/storm.sh &
# The cut: 4.0 to 19.9 s from now.
r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
delay=$((4 + r % 160 / 10)).$((r % 10))
info "boot $VM_BOOT: remaps $REMAPS, acks $NEXT_ACK; power cut in $delay s"
powercut "$delay"
while :; do sleep 1; done
