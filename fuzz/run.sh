#!/usr/bin/env bash
# Run each fuzzer for FUZZ_SECONDS (default 30) from its committed seed
# corpus. The corpus is copied to a temporary folder so that a run never
# writes into the repository; a crash (or hang, or out-of-memory) input is
# kept there and its path printed, and the script exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
seconds=${FUZZ_SECONDS:-30}
work=$(mktemp -d "${TMPDIR:-/tmp}/balancekit-fuzz.XXXXXX")
status=0
for name in request response; do
    mkdir -p "$work/$name/corpus" "$work/$name/crashes"
    cp fuzz/corpus/"$name"/* "$work/$name/corpus/"
    echo "fuzz_$name: ${seconds}s from $(ls fuzz/corpus/"$name" | wc -l) seeds"
    # -timeout: an input that runs 10 s is a hang, kept as timeout-<hash>.
    "$PY" fuzz/fuzz_"$name".py -max_total_time="$seconds" -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$work/$name/crashes/" \
        "$work/$name/corpus" >"$work/$name/log" 2>&1
    code=$?
    if [ "$code" -ne 0 ]; then
        status=1
        tail -n 40 "$work/$name/log"
        if [ -n "$(ls "$work/$name/crashes/")" ]; then
            echo "fuzz_$name found a crash; its input:"
            ls -d "$work/$name/crashes/"*
            echo "add it to fuzz/corpus/$name/ and make it a test before fixing it"
        else
            echo "fuzz_$name exited $code without a crash input (log: $work/$name/log)"
        fi
    else
        grep -E "stat::number_of_executed_units|stat::average_exec_per_sec" "$work/$name/log" |
            sed "s/^/  /"
    fi
done
[ "$status" -eq 0 ] && rm -rf "$work"
exit "$status"
