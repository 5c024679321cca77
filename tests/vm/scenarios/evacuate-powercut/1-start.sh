#!/bin/sh
# A power cut in the middle of an evacuation. Boot 1 creates a volume with a header on the
# main disk, fills it (sha256 of every MiB recorded on a log disk), starts an evacuation onto
# the new disk at 4 MiB/s with a writer acknowledging seqblock writes on the log disk, and cuts
# the power once a quarter of the volume moved. Boot 2 assembles: the evacuation resumes from
# its last committed window, every acknowledged write and every recorded MiB reads back, and
# at the end the new disk is the main.
#vm: cases create cut-mid-copy assembled resumed acked-writes data-intact new-main
#vm: disk main 64M
#vm: disk s1 24M
#vm: disk s2 24M
#vm: disk new 64M
#vm: disk log 8M
#vm: needs remapd remapctl
#vm: timeout 400
. /vm/scenario/_lib.sh

start_agent || { fail create "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if ! out=$(timeout 120 remapctl create "$VOL" --main "$MAIN" --spare /dev/disk/by-vm/s1 --spare /dev/disk/by-vm/s2 --region-size 16MiB 2>&1); then
    fail create "$out"
    exit 1
fi
size=$(json_num "$(status)" size_bytes)
dio-write "$LOG" 0 8000 || { fail create "cannot clear the log disk"; exit 1; }
head -c "$size" /dev/urandom >/tmp/data
dd if=/tmp/data of=$DEV bs=1M oflag=direct status=none
m=0
while [ $m -lt $((size / MIB)) ]; do
    sum=$(dd if=/tmp/data bs=1M skip=$m count=1 status=none | sha256sum | cut -c1-64)
    record $((SUMS_REC + m)) "SUM $m $sum"
    m=$((m + 1))
done
pass create "$((size / MIB)) MiB written, their sums on the log disk"

# The writer: seqblock writes over BLOCKS, each acknowledged by a durable record.
cat >/tmp/writer.sh <<'W'
. /vm/scenario/_lib.sh
seq=0 r=0
while :; do
    for b in $BLOCKS; do
        seq=$((seq + 1))
        seqblock write "$DEV" "$b" "$seq" 2>>/tmp/writer.err || continue
        record $((ACK_REC + r)) "ACK $b $seq" && r=$((r + 1))
    done
done
W
sh /tmp/writer.sh &
remapctl evacuate "$VOL" --to "$NEW" --rate 4 --background >/dev/null ||
    { fail cut-mid-copy "evacuate: $(tail -3 /tmp/remapd.log)"; exit 1; }
n=0
while [ "$(json_num "$(evac)" done_bytes)" -lt $((size / 4)) ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
done_bytes=$(json_num "$(evac)" done_bytes)
if [ "$done_bytes" -ge $((size / 4)) ] && [ "$done_bytes" -lt "$size" ]; then
    pass cut-mid-copy "power cut with $done_bytes of $size bytes moved"
else
    fail cut-mid-copy "moved $done_bytes of $size before the cut"
fi
powercut "0.$(shuf -i 1-9 -n 1)"
sleep 30
