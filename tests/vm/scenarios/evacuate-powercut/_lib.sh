# Shared by the boots of evacuate-powercut (sourced; not a boot of its own).
. /vm/lib.sh

VOL=vol0
DEV=/dev/mapper/$VOL
MAIN=/dev/disk/by-vm/main
NEW=/dev/disk/by-vm/new
LOG=$(vmdisk log)
MIB=1048576
# The writer's blocks (4 KiB): 32 of them in MiB 40-41 of the volume; every other MiB holds
# what boot 1 wrote, its sha256 recorded on the log disk.
BLOCKS=$(awk 'BEGIN { for (k = 0; k < 32; k++) printf "%d ", 40 * 256 + k * 16 + 3 }')
WRITER_MIBS="40 41"
SUMS_REC=0    # sector i: "SUM MIB SHA256" per MiB
ACK_REC=4000  # sector ACK_REC + i: "ACK BLOCK SEQ" per acknowledged write

start_agent() {
    remapd >>/tmp/remapd.out 2>>/tmp/remapd.log &
    agent=$!
    wait_for /tmp/remapd.log "remapd ready" 90
}
status() { timeout 60 remapctl status "$VOL" --json 2>/dev/null; }
evac() { timeout 60 remapctl evacuate "$VOL" --status --json 2>/dev/null; }

# record SECTOR TEXT: one durable 512-byte record on the log disk.
record() {
    printf '%-511s\n' "$2" >/tmp/rec
    dio-write "$LOG" "$1" 1 /tmp/rec
}
# records FIRST COUNT KIND: the valid records of KIND from sector FIRST on, without KIND.
records() {
    /usr/bin/dd if="$LOG" bs=512 skip="$1" count="$2" iflag=direct status=none | tr -d '\000' |
        awk -v k="$3" 'length($0) == 511 && $1 == k { $1 = ""; print substr($0, 2) }'
}
