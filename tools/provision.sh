#!/usr/bin/env bash
# Provision vdev's real dependencies into a cache folder that git ignores.
#
# What this gets, and why each piece comes from where it does:
#   * libvfio-user: not packaged by Debian, but Debian's `qemu` *source*
#     package carries it in subprojects/libvfio-user.  We build it as a shared
#     library with the host's (bookworm) meson/ninja and record the revision
#     that subprojects/libvfio-user.wrap names, refusing revisions whose ABI
#     the ctypes bindings were not written for.
#   * QEMU >= 10.1 with vfio-user-pci: Debian's qemu-system-x86 from
#     trixie-backports (falling back to sid).  It needs a newer glibc than the
#     host has, so its whole dependency closure is unpacked into a private
#     root and started through that root's own dynamic loader by a wrapper.
#
# Apt is driven with a private configuration (sources, state, cache) under the
# cache folder; the host's /etc/apt is never changed.  Every step leaves a
# stamp, so a second run only checks the stamps and finishes in seconds.
#
# Usage: tools/provision.sh [CACHE_DIR]      (default: .deps next to this repo)
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-$repo_root/.deps}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# The libvfio-user revisions vdev/_lib/bindings.py declares prototypes for.
supported_lvu_revisions=(0b28d205572c80b568a1003db2c8f37ca333e4d7)
# Debian suites searched for the QEMU binary, in order of preference.
qemu_binary_suites=(trixie-backports sid)
qemu_min_version=10.1
# Host (bookworm) packages needed to build libvfio-user and unpack packages.
host_packages=(meson ninja-build pkg-config gcc libc6-dev libjson-c-dev libcmocka-dev xz-utils)

say() { printf 'provision: %s\n' "$*" >&2; }
fail() {
    printf 'provision: FAILED: %s\n' "$*" >&2
    exit 1
}

stamp_ok() { [[ -f "$cache/stamps/$1" ]]; }
stamp_set() { mkdir -p "$cache/stamps" && printf '%s\n' "${2:-done}" >"$cache/stamps/$1"; }

# --- host build tools --------------------------------------------------------
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

# --- private apt -------------------------------------------------------------
apt_dir=$cache/apt
apt_conf=$apt_dir/apt.conf

debian_mirror() {
    # Reuse the mirror the host already uses, so no address is baked in here.
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [[ -n "$uri" ]] || uri=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [[ -n "$uri" ]] || fail "cannot find the host's Debian mirror in /etc/apt"
    printf '%s\n' "$uri"
}

setup_private_apt() {
    local mirror keyring=/usr/share/keyrings/debian-archive-keyring.gpg suite
    [[ -f "$keyring" ]] || fail "Debian archive keyring $keyring is missing (package debian-archive-keyring)"
    mkdir -p "$apt_dir"/{etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,state/lists/partial,cache/archives/partial}
    touch "$apt_dir/state/status"
    mirror=$(debian_mirror)
    {
        for suite in trixie "${qemu_binary_suites[@]}"; do
            printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite"
        done
        for suite in "${qemu_binary_suites[@]}"; do
            printf 'deb-src [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite"
        done
    } >"$apt_dir/etc/sources.list"
    cat >"$apt_conf" <<EOF
Dir::Etc "$apt_dir/etc";
Dir::Etc::sourcelist "$apt_dir/etc/sources.list";
Dir::Etc::sourceparts "$apt_dir/etc/sources.list.d";
Dir::Etc::preferencesparts "$apt_dir/etc/preferences.d";
Dir::Etc::parts "$apt_dir/etc/apt.conf.d";
Dir::State "$apt_dir/state";
Dir::State::status "$apt_dir/state/status";
Dir::Cache "$apt_dir/cache";
Debug::NoLocking "true";
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
EOF
    if ! stamp_ok apt-lists; then
        say "updating private apt lists (trixie, ${qemu_binary_suites[*]})"
        APT_CONFIG=$apt_conf apt-get update -qq >/dev/null 2>"$apt_dir/update.log" ||
            fail "private apt-get update failed; see $apt_dir/update.log"
        stamp_set apt-lists
    fi
}

papt() { APT_CONFIG=$apt_conf "$@"; }

# --- QEMU binary closure -----------------------------------------------------
qemu_root=$cache/qemu-root
qemu_wrapper=$cache/bin/qemu-system-x86_64

version_at_least() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }

upstream_version() {
    # 1:11.1.3+ds-1~bpo13+1 -> 11.1.3
    local v=${1#*:}
    v=${v%%+*}
    printf '%s\n' "${v%%-*}"
}

candidate_in_suite() {
    papt apt-cache madison qemu-system-x86 | awk -v s="$1/main" '$0 ~ " "s" " {print $3; exit}'
}

write_qemu_wrapper() {
    # Rewritten on every run (it is tiny), so a changed template reaches old caches.
    local version=$1
    mkdir -p "$cache/bin"
    cat >"$qemu_wrapper" <<EOF
#!/bin/sh
# Generated by tools/provision.sh: runs Debian's QEMU $version from its private
# root through that root's own dynamic loader (the host's glibc is too old).
# LD_PRELOAD is dropped: a preload meant for the host (the sanitizer runtime
# of make test-debug) cannot load into the private root's glibc.
unset LD_PRELOAD
root="$qemu_root"
export QEMU_MODULE_DIR="\$root/usr/lib/x86_64-linux-gnu/qemu"
exec "\$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \\
    --library-path "\$root/usr/lib/x86_64-linux-gnu:\$root/lib/x86_64-linux-gnu" \\
    "\$root/usr/bin/qemu-system-x86_64" \\
    -L "\$root/usr/share/qemu" -L "\$root/usr/share/seabios" "\$@"
EOF
    chmod +x "$qemu_wrapper"
}

provision_qemu() {
    if stamp_ok qemu && [[ -d "$qemu_root" ]]; then
        write_qemu_wrapper "$(cat "$cache/qemu.version")"
        return
    fi
    local suite version="" chosen_suite=""
    for suite in "${qemu_binary_suites[@]}"; do
        version=$(candidate_in_suite "$suite")
        if [[ -n "$version" ]] && version_at_least "$(upstream_version "$version")" "$qemu_min_version"; then
            chosen_suite=$suite
            break
        fi
        version=""
    done
    [[ -n "$version" ]] || fail "no qemu-system-x86 >= $qemu_min_version in ${qemu_binary_suites[*]}"
    say "downloading qemu-system-x86 $version ($chosen_suite) and its dependency closure"
    rm -rf "$apt_dir/cache/archives"/*.deb
    papt apt-get install -y -qq --download-only -t "$chosen_suite" "qemu-system-x86=$version" \
        >"$apt_dir/qemu-download.log" 2>&1 ||
        fail "could not download qemu-system-x86=$version and its dependencies; see $apt_dir/qemu-download.log"

    say "unpacking $(ls "$apt_dir/cache/archives"/*.deb | wc -l) packages into $qemu_root"
    rm -rf "$qemu_root.tmp"
    mkdir -p "$qemu_root.tmp"
    local deb
    for deb in "$apt_dir/cache/archives"/*.deb; do
        dpkg-deb -x "$deb" "$qemu_root.tmp"
    done
    rm -rf "$qemu_root"
    mv "$qemu_root.tmp" "$qemu_root"

    write_qemu_wrapper "$version"
    "$qemu_wrapper" -device help 2>&1 | grep -q '"vfio-user-pci"' ||
        fail "the unpacked QEMU ($version) does not list the vfio-user-pci device"
    # QEMU does not exit when its qtest stream ends, hence the timeout.
    local answer
    answer=$(timeout 10 "$qemu_wrapper" -machine q35 -accel qtest -qtest stdio -qtest-log /dev/null \
        -display none -nodefaults -monitor none -serial none <<<'readl 0x0' 2>/dev/null || true)
    [[ "$answer" == OK* ]] ||
        fail "the unpacked QEMU ($version) cannot start with the qtest accelerator"
    printf '%s\n' "$version" >"$cache/qemu.version"
    stamp_set qemu "$version"
}

# --- libvfio-user ------------------------------------------------------------
lvu_out=$cache/libvfio-user

provision_libvfio_user() {
    if stamp_ok libvfio-user && [[ -f "$lvu_out/lib/libvfio-user.so.0" ]]; then
        return
    fi
    local src_dir=$cache/src tarball="" version wrap revision
    mkdir -p "$src_dir"
    # Newest first; the archive's Sources index can name versions whose files
    # the mirror no longer serves, so try each until one downloads.
    for version in $(papt apt-cache showsrc qemu | awk '/^Version:/ {print $2}' | sort -rV | uniq); do
        say "downloading Debian qemu source $version"
        if (cd "$src_dir" && papt apt-get source -qq --download-only "qemu=$version" >/dev/null 2>&1); then
            tarball=$(ls "$src_dir"/qemu_"$(upstream_version "$version")"*.orig.tar.* 2>/dev/null | head -n1)
            [[ -n "$tarball" ]] && break
        fi
    done
    [[ -n "$tarball" ]] || fail "could not download any version of Debian's qemu source package"

    local top
    top=$(tar -tf "$tarball" | sed -n '1s,/.*,,p')
    rm -rf "${src_dir:?}/$top"
    tar -xf "$tarball" -C "$src_dir" "$top/subprojects/libvfio-user" "$top/subprojects/libvfio-user.wrap" \
        "$top/docs/interop/vfio-user.rst" ||
        fail "$tarball carries no subprojects/libvfio-user"
    wrap=$src_dir/$top/subprojects/libvfio-user.wrap
    revision=$(awk -F' *= *' '$1 == "revision" {print $2}' "$wrap")
    [[ -n "$revision" ]] || fail "no revision in $wrap"
    local ok=0 r
    for r in "${supported_lvu_revisions[@]}"; do [[ "$r" == "$revision" ]] && ok=1; done
    ((ok)) || fail "libvfio-user revision $revision (from $wrap) is not one vdev's bindings support (${supported_lvu_revisions[*]})"

    say "building libvfio-user $revision"
    local build=$cache/build/libvfio-user
    rm -rf "$build"
    meson setup "$build" "$src_dir/$top/subprojects/libvfio-user" --buildtype=release \
        -Ddebug-logs=disabled >"$cache/libvfio-user-build.log" 2>&1 &&
        ninja -C "$build" >>"$cache/libvfio-user-build.log" 2>&1 ||
        fail "libvfio-user build failed; see $cache/libvfio-user-build.log"

    rm -rf "$lvu_out"
    mkdir -p "$lvu_out/lib" "$lvu_out/samples" "$lvu_out/include"
    cp -a "$build"/lib/libvfio-user.so* "$lvu_out/lib/"
    rm -rf "$lvu_out/lib"/*.p
    cp -a "$build/samples/gpio-pci-idio-16" "$build/samples/server" "$build/samples/client" "$lvu_out/samples/"
    cp -a "$src_dir/$top/subprojects/libvfio-user/include/." "$lvu_out/include/"
    cp "$src_dir/$top/docs/interop/vfio-user.rst" "$lvu_out/vfio-user.rst"
    printf '%s\n' "$revision" >"$lvu_out/REVISION"
    stamp_set libvfio-user "$revision"
}

# A second build for `make test-debug`: libvfio-user's own debug checks and
# AddressSanitizer, so memory errors in the C layer surface under the suite.
provision_libvfio_user_debug() {
    local out=$cache/libvfio-user-debug revision src build=$cache/build/libvfio-user-debug
    revision=$(cat "$lvu_out/REVISION")
    if stamp_ok libvfio-user-debug && [[ -f "$out/lib/libvfio-user.so.0" ]] &&
        [[ "$(cat "$out/REVISION")" == "$revision" ]]; then
        return
    fi
    say "building libvfio-user $revision (debug, AddressSanitizer)"
    src=$(ls -d "$cache"/src/qemu-*/subprojects/libvfio-user | head -n1)
    rm -rf "$build" "$out"
    meson setup "$build" "$src" --buildtype=debug -Ddebug-logs=enabled -Db_sanitize=address \
        >"$cache/libvfio-user-debug-build.log" 2>&1 &&
        ninja -C "$build" lib/libvfio-user.so.0.0.1 >>"$cache/libvfio-user-debug-build.log" 2>&1 ||
        fail "libvfio-user debug build failed; see $cache/libvfio-user-debug-build.log"
    mkdir -p "$out/lib"
    cp -a "$build"/lib/libvfio-user.so* "$out/lib/"
    rm -rf "$out/lib"/*.p
    printf '%s\n' "$revision" >"$out/REVISION"
    stamp_set libvfio-user-debug "$revision"
}

ensure_host_packages
setup_private_apt
provision_qemu
provision_libvfio_user
provision_libvfio_user_debug
say "ready: QEMU $(cat "$cache/qemu.version"), libvfio-user $(cat "$lvu_out/REVISION")"
