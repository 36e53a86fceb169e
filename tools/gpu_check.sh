#!/usr/bin/env bash
# One prepared check of the whole GPU path, in two halves (tools/README.md, "GPU check"):
#
#   tools/gpu_check.sh build [DIR]   on a machine with Rust and nvcc (no GPU needed): builds the
#                                    release test binaries, mcs-engine and the op benchmark with every
#                                    kernel compiled by nvcc, and packs them with the fixtures they
#                                    read into DIR (default target/gpu-kit), under 64 MiB.
#   DIR/gpu_check.sh run DIR         on the GPU machine (driver, CUDA libraries, compute-sanitizer; no
#                                    Rust, no network), within about 8 minutes: every test binary with
#                                    REQUIRE_GPU=1, compute-sanitizer memcheck / racecheck on the
#                                    kernel tests, `mcs-engine info`, the op benchmarks, a
#                                    paper-size predict and paper-size and small training steps;
#                                    one summary table, full logs in DIR/logs/.
#   DIR/gpu_check.sh unpack DIR      only unpacks the gzipped binaries into DIR/unpacked/ (run does it).
#   tools/gpu_check.sh selftest      checks the log parsing on saved sample outputs (no GPU, no build).
#
# Environment: NVCC (build: the nvcc to use), CARGO_TARGET_DIR (build), GPU_CHECK_TEST_TIMEOUT,
# GPU_CHECK_SANITIZER_TIMEOUT, GPU_CHECK_SANITIZER_FILTER (run; see below).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KIT_LIMIT_BYTES=$((64 * 1024 * 1024))
PINNED_NVCC="$HOME/.cache/mcs-engine/cuda-13.0.88/nvidia/cu13/bin/nvcc"

# Test binaries whose GPU tests exercise one kernel family each (memcheck runs on all of them) and
# the ones with shared-memory cooperation worth a racecheck.
MEMCHECK_BINARIES="elementwise layernorm softmax reduce movement philox spatial conv prob_attention matmul attention loss softcon adam dropout batchnorm pool eca"
RACECHECK_BINARIES="prob_attention softmax layernorm reduce loss softcon"

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Parsing (shared by `run` and `selftest`)

# "passed failed skips" of one libtest binary's output: the sums over its `test result:` lines,
# and how many `skip: no GPU` lines reached the log (libtest captures the output of passing tests,
# so this only sees skips under --nocapture; `run` relies on REQUIRE_GPU=1, which turns a skip
# into a panic and so into a failed test).
parse_test_log() {
    awk '
        /^test result: / {
            for (i = 1; i <= NF; i++) {
                if ($(i + 1) ~ /^passed;?$/) passed += $i
                if ($(i + 1) ~ /^failed;?$/) failed += $i
            }
            results++
        }
        /^skip: no GPU/ { skips++ }
        END {
            # No result line at all: the binary crashed or was killed before finishing.
            if (results == 0) failed += 1
            printf "%d %d %d\n", passed, failed, skips
        }' "$1"
}

# The number of errors compute-sanitizer reported: its "ERROR SUMMARY: N errors" line, or, when a
# racecheck log has only "RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)", E.
# Prints "-" when the log has neither (the tool did not finish).
parse_sanitizer_log() {
    awk '
        /^========= ERROR SUMMARY: [0-9]+ error/ { errors = $4; have_errors = 1 }
        /^========= RACECHECK SUMMARY: / {
            if (match($0, /\([0-9]+ error/)) { split(substr($0, RSTART + 1), w, " "); races += w[1]; have_races = 1 }
        }
        END {
            if (have_errors) print errors
            else if (have_races) print races
            else print "-"
        }' "$1"
}

# ---------------------------------------------------------------------------------------------
# build

build_kit() {
    local root kit target nvcc
    root="$(cd "$SCRIPT_DIR/.." && pwd)"
    kit="${1:-$root/target/gpu-kit}"
    nvcc="${NVCC:-}"
    if [[ -z "$nvcc" && -x "$PINNED_NVCC" ]]; then nvcc="$PINNED_NVCC"; fi
    [[ -n "$nvcc" && -x "$nvcc" ]] || die "build needs nvcc (set NVCC, or install the pinned toolkit at $PINNED_NVCC): the GPU machine may lack libnvrtc, so the kit must carry prebuilt PTX"
    command -v python3 >/dev/null || die "build needs python3 (to read cargo's JSON messages)"
    export NVCC="$nvcc"
    target="${CARGO_TARGET_DIR:-$root/target}"
    export CARGO_TARGET_DIR="$target"
    cd "$root"

    echo "gpu_check build: nvcc $NVCC, target dir $CARGO_TARGET_DIR, kit $kit"
    local messages
    messages="$(mktemp)"
    cargo test --release --no-run --message-format=json >"$messages"
    cargo bench --no-run --message-format=json >>"$messages"
    cargo build --release --bin mcs-engine --message-format=json >>"$messages"
    # The GPU machine may have no libnvrtc: every family must carry nvcc-built PTX.
    local info families prebuilt
    info="$("$CARGO_TARGET_DIR/release/mcs-engine" info)"
    read -r families prebuilt < <(sed -n 's/^kernels: \([0-9]*\) families, \([0-9]*\) with nvcc-built.*/\1 \2/p' <<<"$info")
    [[ -n "$families" && "$families" == "$prebuilt" ]] ||
        die "only ${prebuilt:-?} of ${families:-?} kernel families have nvcc-built PTX (mcs-engine info: $(grep '^kernels' <<<"$info"))"

    rm -rf "$kit"
    mkdir -p "$kit/tests" "$kit/bin"
    # One line per executable: "<kind> <name> <path>" (kind: test, bench or bin).
    python3 - "$messages" >"$kit/manifest.txt" <<'PY'
import json, sys
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable") if m.get("reason") == "compiler-artifact" else None
    if not exe or exe in seen:
        continue
    seen.add(exe)
    target, profile = m["target"], m.get("profile", {})
    kinds = target["kind"]
    if "bench" in kinds:
        kind, name = "bench", target["name"]
    elif profile.get("test"):
        kind = "test"
        name = "lib" if "lib" in kinds else target["name"]
    elif "bin" in kinds:
        kind, name = "bin", target["name"]
    else:
        continue
    print(kind, name, exe)
PY
    local kind name exe dest
    while read -r kind name exe; do
        case "$kind" in
            test) dest="$kit/tests/$name" ;;
            bench) dest="$kit/bin/bench-$name" ;;
            bin) dest="$kit/bin/$name" ;;
        esac
        cp "$exe" "$dest"
        # Debug info is most of a release test binary; the symbols (for backtraces) stay. gzip
        # then shrinks each binary about 4x, which keeps the kit under 64 MiB; `run` unpacks.
        strip --strip-debug "$dest" 2>/dev/null || true
        gzip -9 -f "$dest"
    done < <(awk '$1 == "test" || $1 == "bench" || ($1 == "bin" && $2 == "mcs-engine")' "$kit/manifest.txt")
    rm -f "$messages"
    mkdir -p "$kit/tests/fixtures" "$kit/weights"
    cp -r tests/fixtures/. "$kit/tests/fixtures/"
    cp -r weights/. "$kit/weights/"
    cp "$SCRIPT_DIR/gpu_check.sh" "$kit/gpu_check.sh"
    git -C "$root" log -1 --format='%H %s' >"$kit/COMMIT" 2>/dev/null || echo unknown >"$kit/COMMIT"

    local count bytes
    count=$(find "$kit/tests" -maxdepth 1 -type f -name '*.gz' | wc -l)
    bytes=$(du -sb "$kit" | cut -f1)
    echo "gpu_check build: $count test binaries, $(ls "$kit/bin" | tr '\n' ' ')in $kit: $((bytes / 1024 / 1024)) MiB"
    if ((bytes > KIT_LIMIT_BYTES)); then
        die "the kit is $bytes bytes, over the 64 MiB limit ($KIT_LIMIT_BYTES)"
    fi
    [[ -f "$kit/bin/mcs-engine.gz" ]] || die "mcs-engine was not built into the kit"
    echo "gpu_check build: done; on the GPU machine run: $kit/gpu_check.sh run $kit"
}

# ---------------------------------------------------------------------------------------------
# unpack: the kit's gzipped binaries into DIR/unpacked/{tests,bin} (done by `run`; also handy to
# try the binaries from another folder on a machine without a GPU).

unpack_kit() {
    local kit="$1" packed name
    [[ -d "$kit/tests" && -f "$kit/bin/mcs-engine.gz" ]] || die "$kit is not a kit made by gpu_check.sh build"
    rm -rf "$kit/unpacked"
    mkdir -p "$kit/unpacked/tests" "$kit/unpacked/bin"
    for packed in "$kit"/tests/*.gz "$kit"/bin/*.gz; do
        name="$(basename "$packed" .gz)"
        gunzip -c "$packed" >"$kit/unpacked/$(basename "$(dirname "$packed")")/$name"
        chmod +x "$kit/unpacked/$(basename "$(dirname "$packed")")/$name"
    done
}

# ---------------------------------------------------------------------------------------------
# run

# Why this machine cannot run the GPU half, or nothing.
gpu_missing_reason() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "nvidia-smi not found: this machine has no NVIDIA driver"
        return
    fi
    if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]'; then
        echo "nvidia-smi lists no GPU"
        return
    fi
}

ROWS=()
row() { ROWS+=("$(printf '%-34s %7s %7s %10s %8s' "$@")"); }

# Runs one step with a timeout, logging to $logs/$1.log; prints its wall time in seconds.
timed() {
    local log="$1" limit="$2"
    shift 2
    local start end
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || echo "(exit status $?)" >>"$log"
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }'
}

run_kit() {
    local kit="${1:-}"
    [[ -n "$kit" ]] || die "usage: gpu_check.sh run DIR (the folder made by gpu_check.sh build)"
    [[ -d "$kit" ]] || die "$kit is not a folder"
    kit="$(cd "$kit" && pwd)"
    [[ -d "$kit/tests" && -f "$kit/bin/mcs-engine.gz" ]] || die "$kit is not a kit made by gpu_check.sh build"
    local missing
    missing="$(gpu_missing_reason)"
    if [[ -n "$missing" ]]; then
        echo "gpu_check run: refusing: $missing. This half needs the GPU machine; build the kit here with 'tools/gpu_check.sh build'." >&2
        exit 3
    fi
    local logs="$kit/logs"
    rm -rf "$logs"
    mkdir -p "$logs"
    unpack_kit "$kit"
    local tests="$kit/unpacked/tests" engine="$kit/unpacked/bin/mcs-engine" bench="$kit/unpacked/bin/bench-ops"
    export REQUIRE_GPU=1 MCS_ROOT="$kit" MCS_ENGINE_BIN="$engine"
    local test_timeout="${GPU_CHECK_TEST_TIMEOUT:-120}"
    local sanitizer_timeout="${GPU_CHECK_SANITIZER_TIMEOUT:-60}"
    # Sanitizers slow kernels 10-100x: only the GPU-vs-CPU tests (names containing "gpu"), which
    # use small shapes, run under them.
    local sanitizer_filter="${GPU_CHECK_SANITIZER_FILTER:-gpu}"
    local started=$SECONDS failures=0
    cd "$kit"
    nvidia-smi >"$logs/nvidia-smi.log" 2>&1 || true

    local seconds name bin counts passed failed skips
    for bin in "$tests"/*; do
        [[ -f "$bin" && -x "$bin" ]] || continue
        name="$(basename "$bin")"
        seconds=$(timed "$logs/test-$name.log" "$test_timeout" "$bin" --test-threads=4)
        read -r passed failed skips < <(parse_test_log "$logs/test-$name.log")
        failed=$((failed + skips))
        ((failed == 0)) || failures=$((failures + 1))
        row "test $name" "$passed" "$failed" "-" "$seconds"
    done

    local sanitizer
    sanitizer="$(command -v compute-sanitizer || true)"
    if [[ -z "$sanitizer" ]]; then
        row "compute-sanitizer: not found" "-" "1" "-" "0"
        failures=$((failures + 1))
    else
        local tool errors
        for tool in memcheck racecheck; do
            local list="$MEMCHECK_BINARIES"
            [[ "$tool" == racecheck ]] && list="$RACECHECK_BINARIES"
            for name in $list; do
                [[ -x "$tests/$name" ]] || continue
                seconds=$(timed "$logs/$tool-$name.log" "$sanitizer_timeout" \
                    "$sanitizer" --tool "$tool" --error-exitcode 99 "$tests/$name" "$sanitizer_filter" --test-threads=1)
                read -r passed failed skips < <(parse_test_log "$logs/$tool-$name.log")
                errors=$(parse_sanitizer_log "$logs/$tool-$name.log")
                failed=$((failed + skips))
                if ((failed > 0)) || [[ "$errors" != 0 ]]; then failures=$((failures + 1)); fi
                row "$tool $name" "$passed" "$failed" "$errors" "$seconds"
            done
        done
    fi

    seconds=$(timed "$logs/info.log" 60 "$engine" info)
    if grep -q '^GPU: available' "$logs/info.log"; then row "mcs-engine info" 1 0 - "$seconds"; else
        row "mcs-engine info (no GPU!)" 0 1 - "$seconds"; failures=$((failures + 1)); fi

    if [[ -x "$bench" ]]; then
        seconds=$(timed "$logs/bench-ops.log" 180 "$bench" --bench)
        if grep -q '^cuda' "$logs/bench-ops.log"; then row "bench ops" 1 0 - "$seconds"; else
            row "bench ops (no cuda rows)" 0 1 - "$seconds"; failures=$((failures + 1)); fi
    fi

    seconds=$(timed "$logs/predict-paper.log" 180 "$engine" predict --config unimedclip-vit-b16 \
        --samples 30 --device cuda --tokenizer "$kit/weights/tiny/tokenizer.json" --out "$logs/predict-paper")
    if grep -q '30 samples on cuda' "$logs/predict-paper.log"; then row "predict paper-size, 30 samples" 1 0 - "$seconds"; else
        row "predict paper-size, 30 samples" 0 1 - "$seconds"; failures=$((failures + 1)); fi

    # One paper-size training step at the official batch of 24 (time and tensor memory), and the
    # default small config's step, as `mcs-engine train` runs them on a GPU.
    for case in "unimedclip-vit-b16 24" "small 16"; do
        set -- $case
        seconds=$(timed "$logs/train-$1.log" 240 "$engine" bench train --config "$1" --batch-size "$2" \
            --steps 5 --warmup 2 --device cuda)
        if grep -q 'on cuda' "$logs/train-$1.log"; then row "train step $1, batch $2" 1 0 - "$seconds"; else
            row "train step $1, batch $2" 0 1 - "$seconds"; failures=$((failures + 1)); fi
    done

    {
        printf '%-34s %7s %7s %10s %8s\n' "step" "passed" "failed" "sanitizer" "seconds"
        printf '%s\n' "${ROWS[@]}"
        echo
        echo "predict: $(grep '30 samples' "$logs/predict-paper.log" || echo 'no result, see logs/predict-paper.log')"
        grep -h '^train step' "$logs"/train-*.log 2>/dev/null || true
        echo "benchmarks (logs/bench-ops.log):"
        grep '^cuda' "$logs/bench-ops.log" 2>/dev/null || true
        echo
        echo "kit $(cat "$kit/COMMIT" 2>/dev/null); $((SECONDS - started)) s in all; $failures failing step(s); logs in $logs"
    } | tee "$logs/summary.txt"
    ((failures == 0)) || exit 1
}

# ---------------------------------------------------------------------------------------------
# selftest: the parsers against saved sample outputs (tools/tests/gpu_check_samples/)

selftest() {
    local samples="$SCRIPT_DIR/tests/gpu_check_samples" bad=0 file want got
    [[ -d "$samples" ]] || die "no samples at $samples"
    # Each sample's first line states what the parser must return: "# expect: <output>".
    for file in "$samples"/*.txt; do
        want="$(sed -n '1s/^# expect: //p' "$file")"
        case "$(basename "$file")" in
            sanitizer-*) got="$(parse_sanitizer_log "$file")" ;;
            test-*) got="$(parse_test_log "$file")" ;;
            *) continue ;;
        esac
        if [[ "$got" == "$want" ]]; then echo "ok   $(basename "$file"): $got"; else
            echo "FAIL $(basename "$file"): got '$got', expected '$want'"; bad=$((bad + 1)); fi
    done
    # The run half must refuse cleanly on a machine without a GPU (simulated by hiding
    # nvidia-smi behind an empty PATH entry for the check).
    local fake
    fake="$(mktemp -d)"
    mkdir -p "$fake/tests" "$fake/bin"
    printf '#!/bin/sh\nexit 0\n' | gzip >"$fake/bin/mcs-engine.gz"
    printf '#!/bin/sh\necho "No devices were found"\nexit 6\n' >"$fake/nvidia-smi"
    chmod +x "$fake/nvidia-smi"
    local status=0 message
    message="$(PATH="$fake:/usr/bin:/bin" bash "$SCRIPT_DIR/gpu_check.sh" run "$fake" 2>&1)" || status=$?
    if ((status == 3)) && [[ "$message" == *"refusing: nvidia-smi lists no GPU"* ]]; then
        echo "ok   run refuses without a GPU (exit $status)"
    else
        echo "FAIL run without a GPU: exit $status, message: $message"; bad=$((bad + 1))
    fi
    rm -rf "$fake"
    ((bad == 0)) || die "selftest: $bad failure(s)"
    echo "selftest: all passed"
}

case "${1:-}" in
    build) build_kit "${2:-}" ;;
    run) run_kit "${2:-}" ;;
    unpack) unpack_kit "${2:?usage: gpu_check.sh unpack DIR}" ;;
    selftest) selftest ;;
    *) die "usage: gpu_check.sh build [DIR] | run DIR | unpack DIR | selftest" ;;
esac
