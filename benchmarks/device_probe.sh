#!/usr/bin/env bash
# What the machine does during ours' steady state, for device_run.sh (run in the background):
# waits for the next ours stage log under LOGS (a folder throughput.py makes after this starts)
# to show its first result, then for a few seconds samples
#   PREFIX-top.txt    every process's CPU over 3 s (top's second frame), and the machine's total
#   PREFIX-actor.txt  the newest scoring actor's threads, py-spy at 250 Hz for 3 s, idle stacks
#                     included (collapsed stacks: what each thread runs or waits on)
# The first H200 run left open what bounds --device-decode (the GPU idle 38 % of the time with
# one actor): this is the profile that would show it. Needs py-spy (carried in the bundle) for
# the second file; gives up quietly after LIMIT seconds or when there is nothing to sample.
#   benchmarks/device_probe.sh LOGS PREFIX [LIMIT] [PY_SPY]
set -u
logs=$1 prefix=$2 limit=${3:-200} pyspy=${4:-py-spy}
known=" $(cd "$logs" 2>/dev/null && echo */) "  # the invocations before this one
deadline=$((SECONDS + limit))
log=""
while [ -z "$log" ] && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.5
    for f in "$logs"/*/ours-*.log; do
        [ -f "$f" ] || continue
        case "$known" in *" $(basename "$(dirname "$f")")/ "*) continue ;; esac
        if grep -q "progress: first" "$f"; then log=$f; break; fi
    done
done
[ -n "$log" ] || exit 0
sleep 1  # past the burst of results queued behind the first
echo "sampling during $log at $(date -u +%T)" > "$prefix-top.txt"
top -b -n 2 -d 3 -w 250 2>&1 | awk '/^top -/ {frame++} frame == 2' | head -45 >> "$prefix-top.txt" &
pid=$(pgrep -n -f "ray::ScoringActor")  # the newest: this run's, not an older cluster's
if [ -n "$pid" ] && command -v "$pyspy" > /dev/null; then
    timeout 30 "$pyspy" record --pid "$pid" --duration 3 --rate 250 --threads --idle --nonblocking \
        --format raw -o "$prefix-actor.txt" > "$prefix-pyspy.log" 2>&1
fi
wait
