#!/usr/bin/env bash
# Renders an `mcs-engine eval --report` page in headless Chromium to a PNG and checks that the
# page loads nothing but itself (docs/eval_report.md §7).
#
#   tools/report_screenshot.sh REPORT.html OUT.png [WIDTHxHEIGHT] [SCALE]
#
# WIDTHxHEIGHT is the browser window in CSS pixels (default 1200x3000; the screenshot is the top
# of the page that fits in it), SCALE the device scale factor (default 1; 0.6 makes a smaller
# PNG of the same layout). Needs Chromium: Debian's package `chromium` is installed with apt-get
# when missing and this runs as root; otherwise the script says what to install.
#
# How a failed resource is caught, without JavaScript in the page:
#   1. the page is rendered with every host name unresolvable and a proxy that does not exist,
#      so nothing can come from the network; Chromium logs at verbosity 1 every file it opens
#      (`FileURLLoader::Start`) and every network request (`NotifyBeforeURLRequest`);
#      after the report's own `FileURLLoader::Start` any file load, and any request to a host
#      the page names, is a resource the page asked for: the check fails and lists them (a
#      self-contained report asks for none, so none can fail). Chromium's own background
#      requests (its update and account services) name hosts the page does not and are ignored;
#   2. the DOM Chromium parsed (`--dump-dom`) must hold no src/href/xlink:href other than
#      data: URIs and in-page #anchors, no CSS url() other than data:, no @import and no
#      <script>.
# Exit 0 when both hold and the PNG was written; 1 with the offending lines otherwise.

set -euo pipefail

if [[ $# -lt 2 || $# -gt 4 ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
report=$1
png=$2
window=${3:-1200x3000}
scale=${4:-1}

if [[ ! -f $report ]]; then
    echo "error: $report: no such file" >&2
    exit 1
fi
if [[ ! $window =~ ^[0-9]+x[0-9]+$ ]]; then
    echo "error: window size '$window' is not WIDTHxHEIGHT (e.g. 1200x3000)" >&2
    exit 2
fi

chromium_binary() {
    local name
    for name in chromium chromium-browser google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if ! browser=$(chromium_binary); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "Chromium not found: installing Debian's package chromium with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >&2 ||
            { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >&2; }
        browser=$(chromium_binary)
    else
        echo "error: no Chromium found; install it (Debian: sudo apt-get install chromium) and run again" >&2
        exit 1
    fi
fi

absolute=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
# file:// URL of the report, with the characters a path may hold that a URL may not escaped.
url="file://$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$absolute" 2>/dev/null || echo "$absolute")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

common=(
    --headless --no-sandbox --disable-gpu --disable-background-networking
    --disable-component-update --disable-sync --no-first-run --no-default-browser-check
    --host-resolver-rules="MAP * ~NOTFOUND" --proxy-server="http://127.0.0.1:9"
    --enable-logging=stderr --v=1
)

status=0
timeout 120 "$browser" "${common[@]}" --user-data-dir="$work/profile-shot" \
    --window-size="${window/x/,}" --force-device-scale-factor="$scale" --hide-scrollbars \
    --screenshot="$work/shot.png" "$url" 2>"$work/shot.log" >/dev/null || status=$?
if [[ $status -ne 0 || ! -s $work/shot.png ]]; then
    echo "error: Chromium did not render $report (exit $status); the end of its log:" >&2
    tail -20 "$work/shot.log" >&2
    exit 1
fi

# 1. Loads after the page's own.
after_page=$(awk -v page="FileURLLoader::Start: $url" 'seen { print } index($0, page) { seen = 1 }' "$work/shot.log")
if ! grep -qF "FileURLLoader::Start: $url" "$work/shot.log"; then
    echo "error: Chromium's log does not show the report being loaded ($url); cannot check its resources" >&2
    exit 1
fi
failed=$(grep -F "FileURLLoader::Start:" <<<"$after_page" | sed 's/.*FileURLLoader::Start: /file load: /' || true)
while read -r request; do
    [[ -z $request ]] && continue
    host=$(sed -E 's#^[a-z]+://([^/:?]+).*#\1#' <<<"$request")
    if grep -qF "$host" "$report"; then
        failed+=$'\n'"network request: $request"
    fi
done < <(grep -F "NotifyBeforeURLRequest:" <<<"$after_page" | sed 's/.*NotifyBeforeURLRequest: //' || true)

# 2. The parsed DOM references nothing outside itself.
timeout 120 "$browser" "${common[@]}" --user-data-dir="$work/profile-dom" --dump-dom "$url" \
    >"$work/dom.html" 2>"$work/dom.log" || true
if [[ ! -s $work/dom.html ]]; then
    echo "error: Chromium did not dump the DOM of $report" >&2
    exit 1
fi
references=$(grep -oE '(src|href|xlink:href)="[^"]*"' "$work/dom.html" | grep -vE '="(data:|#)' | cut -c1-120 || true)
[[ -n $references ]] && failed+=$'\n'"reference: ${references//$'\n'/$'\n'reference: }"
css=$(grep -oE 'url\([^)]{0,60}|@import[^;]{0,60}|<script' "$work/dom.html" | grep -vE '^url\((["'\'']?)data:' || true)
[[ -n $css ]] && failed+=$'\n'"css/script: ${css//$'\n'/$'\n'css/script: }"

failed=$(sed '/^$/d' <<<"$failed")
if [[ -n $failed ]]; then
    echo "error: $report asks for resources outside itself:" >&2
    echo "$failed" >&2
    exit 1
fi

cp "$work/shot.png" "$png"
echo "$png: $(stat -c %s "$png") bytes; $report loaded no resource besides itself"
