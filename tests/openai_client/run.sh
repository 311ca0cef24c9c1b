#!/usr/bin/env bash
# The official `openai` Python client against `seer serve` with the tiny LLaVA fixture:
# makes (or reuses) a venv with openai under target/, starts target/debug/seer on a free
# port, runs test_openai.py, and stops the server however the run ends.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

venv="$root/target/openai-venv"
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    echo "openai client: creating $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1,<3"
fi

seer="$root/target/debug/seer"
if [ ! -x "$seer" ]; then
    # `cargo test --workspace` builds it; build it here when run on its own.
    cargo build --quiet -p seer-cli
fi

log="$(mktemp)"
key="test-key-$$"
"$seer" serve --model tests/fixtures/llava/tiny-llava-hub --host 127.0.0.1 --port 0 \
    --allow-private-urls --api-key "$key" >"$log" 2>&1 &
pid=$!
cleanup() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT

# The server prints one line when listening and one when the model is ready.
url=""
for _ in $(seq 1 600); do
    url="$(sed -n 's|^seer: listening on \(http://[^ ]*\)$|\1|p' "$log")"
    if [ -n "$url" ] && grep -q "^seer: model .* ready" "$log"; then
        break
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "openai client: seer serve exited early:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$url" ] || ! grep -q "^seer: model .* ready" "$log"; then
    echo "openai client: seer serve did not get ready in 60 s:" >&2
    cat "$log" >&2
    exit 1
fi

SEER_URL="$url" SEER_API_KEY="$key" "$venv/bin/python" tests/openai_client/test_openai.py
