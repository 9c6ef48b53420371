# Shell helpers shared by tools/provision.sh and tools/guest.sh (sourced, not run).
# The sourcing script sets `log_prefix` and the `host_packages` array first.

say() { printf '%s: %s\n' "$log_prefix" "$*" >&2; }

fail() {
    printf '%s: FAILED: %s\n' "$log_prefix" "$*" >&2
    exit 1
}

# Install the host (bookworm) packages in `host_packages` that are missing,
# refreshing the host's package lists once if the first attempt fails.
ensure_host_packages() {
    local missing=() pkg
    for pkg in "${host_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return
    say "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            fail "could not install host packages: ${missing[*]} (apt-get install failed)"
    fi
}
