# Shell library for guest scripts: `. /vm/lib.sh`.
# Results go to the results channel through the `result` helper; see tests/vm/README.md.

pass() { result pass "$@"; }
fail() { result fail "$@"; }
skip() { result skip "$@"; }
info() { result info "$@"; }

# expect_eq CASE WHAT EXPECTED ACTUAL: returns 1 (and reports FAIL CASE) when they differ.
expect_eq() {
    if [ "$3" != "$4" ]; then
        fail "$1" "$2: expected '$3', got '$4'"
        return 1
    fi
}

# wait_for FILE PATTERN SECONDS: waits until FILE contains PATTERN (grep -E).
wait_for() {
    _n=$(( $3 * 10 ))
    while [ "$_n" -gt 0 ]; do
        grep -Eq -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
        _n=$((_n - 1))
    done
    return 1
}

# json_num LINE KEY: the numeric value of "KEY":N in a one-line JSON object.
json_num() { printf '%s\n' "$1" | sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9]*\).*/\1/p"; }

# json_str LINE KEY: the string value of "KEY":"..." in a one-line JSON object.
json_str() { printf '%s\n' "$1" | sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p"; }

# One remap's field, from `remap list --json` of volume $VOL (a one-line array):
# remap_field CHUNK KEY
remap_field() {
    remapctl remap list "$VOL" --json | sed 's/},{/}\n{/g' | grep "\"chunk\":$1[,}]" | {
        read -r l
        v=$(json_num "$l" "$2")
        [ -n "$v" ] || v=$(json_str "$l" "$2")
        echo "$v"
    }
}

# start_agent [CRASH_POINT]: starts remapd (aborting at CRASH_POINT, REMAP_CRASH_AT, when
# given), its log in $log (a file per start), its pid in $agent; waits until it is ready.
start_agent() {
    starts=$((starts + 1))
    log=/tmp/remapd.$starts.log
    if [ -n "$1" ]; then
        REMAP_CRASH_AT=$1 remapd >>/tmp/remapd.out 2>"$log" &
    else
        remapd >>/tmp/remapd.out 2>"$log" &
    fi
    agent=$!
    wait_for "$log" "remapd ready" 60
}
stop_agent() {
    kill -TERM "$agent" 2>/dev/null
    wait "$agent"
}

# dm_tables: the table of every device-mapper device, sorted, with references to other
# devices written as their names (a fresh assembly may number region devices differently).
dm_tables() {
    dmsetup ls | awk '{ gsub(/[()]/, "", $2); print $2, $1 }' >/tmp/mm
    dmsetup table | awk 'NR == FNR { m[$1] = $2; next } { for (i = 1; i <= NF; i++) if ($i in m) $i = m[$i]; print }' /tmp/mm - | sort
}
