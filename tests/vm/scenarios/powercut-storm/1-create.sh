#!/bin/sh
# Power cuts during a remap storm, on persistent virtio disks. Boot 1 creates the volume;
# each storm boot (2 by default, 20 with --soak) assembles it, verifies every write
# acknowledged before the previous power cut, then runs an fsync'd writer and a storm of
# remaps and cuts the power at a random moment; the final boot verifies once more, checks that
# no extent is owned twice, that remaps were kept, and that a stop and a fresh assembly
# rebuild the same tables. The ack log lives on its own disk, one O_DIRECT + fsync'd record
# per acknowledged write, so it survives the cuts. The main disk has one sector that always
# fails reads (blkdebug): its chunk is remapped automatically in the first storm boot and must
# stay remapped.
#vm: cases create assemble acked-writes no-double-extent remaps-monotonic auto-remap-kept remaps-kept table-reassembles
#vm: disk main 64M inject=read_aio:5:40000
#vm: disk s1 24M
#vm: disk s2 24M
#vm: disk log 8M
#vm: needs remapd remapctl
#vm: timeout 300
. /vm/scenario/_lib.sh

start_agent || { fail create "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
if out=$(timeout 120 remapctl create --in-place "$VOL" --main "$MAIN" --spare "$S1" --spare "$S2" --region-size 16MiB 2>&1) &&
    [ -b "$DEV" ]; then
    st=$(status)
    expect_eq create regions 4 "$(json_num "$st" regions)" &&
        expect_eq create remaps 0 "$(json_num "$st" remaps)" &&
        pass create "$(json_str "$st" main) and two spares; workload blocks: 64, one every 1 MiB"
else
    fail create "$out"
    exit 1
fi
# An empty ack log (the disk file starts sparse; say so explicitly) and the first boot record.
dio-write "$LOG" 0 $((BOOT_REC + 64)) || { fail create "cannot clear the log disk"; exit 1; }
record $((BOOT_REC + VM_BOOT)) "BOOT $VM_BOOT remaps 0 generation $(json_num "$st" generation)"
kill -TERM $agent
wait $agent
exit 0
