#!/usr/bin/env bash
# Provision vdev's real dependencies into a cache folder that git ignores.
#
# What this gets, and why each piece comes from where it does:
#   * libvfio-user: not packaged by Debian, but Debian's `qemu` *source*
#     package carries it in subprojects/libvfio-user.  We record the revision
#     that subprojects/libvfio-user.wrap names, refusing revisions whose ABI
#     the ctypes bindings were not written for, apply vdev's own patch series
#     (tools/libvfio-user-patches, in file-name order) to a copy of that
#     source, and build the copy with the host's (bookworm) meson/ninja: a
#     release build and a debug+AddressSanitizer build.  A changed patch
#     series rebuilds both; a patch that does not apply stops provisioning.
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

log_prefix=provision
# shellcheck source=tools/common.sh
source "$(dirname "$0")/common.sh"

repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-$repo_root/.deps}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# The libvfio-user revisions vdev/libvfio_user/bindings.py declares prototypes for.
supported_lvu_revisions=(0b28d205572c80b568a1003db2c8f37ca333e4d7)
# Debian suites searched for the QEMU binary, in order of preference.
qemu_binary_suites=(trixie-backports sid)
qemu_min_version=10.1
# Host (bookworm) packages needed to build libvfio-user and unpack packages.
host_packages=(meson ninja-build pkg-config gcc libc6-dev libjson-c-dev libcmocka-dev xz-utils patch)
# vdev's patches to libvfio-user.
lvu_patches_dir=$repo_root/tools/libvfio-user-patches


stamp_ok() { [[ -f "$cache/stamps/$1" ]]; }
stamp_set() { mkdir -p "$cache/stamps" && printf '%s\n' "${2:-done}" >"$cache/stamps/$1"; }

# --- host build tools --------------------------------------------------------

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
lvu_debug_out=$cache/libvfio-user-debug
lvu_unpatched_out=$cache/libvfio-user-unpatched
lvu_patched=$cache/build/libvfio-user-src

lvu_patches() { find "$lvu_patches_dir" -maxdepth 1 -name '*.patch' | sort; }

# The patch set, as vdev records it: a hash over the series (names and
# contents, in order), then one line per patch.  Both builds' stamps hold
# it, so changing, adding or removing a patch rebuilds them.
lvu_patch_record() {
    local patch sums=""
    for patch in $(lvu_patches); do
        sums+="$(sha256sum "$patch" | cut -c1-64) $(basename "$patch")"$'\n'
    done
    printf 'set %s\n%s' "$(printf '%s' "$sums" | sha256sum | cut -c1-64)" "$sums"
}

# Whether the build in $1 exists and was made from revision $2 with the
# current patch set.
lvu_build_current() {
    [[ -f "$1/lib/libvfio-user.so.0" ]] && [[ "$(cat "$1/REVISION" 2>/dev/null)" == "$2" ]] &&
        [[ "$(cat "$1/PATCHES" 2>/dev/null)" == "$(lvu_patch_record)" ]]
}

# The libvfio-user source that Debian's qemu source package carries, as an
# earlier run extracted it (empty if none did).
# The extracted libvfio-user source, or nothing before the first download (no error: pipefail is on).
lvu_pristine() {
    [[ -d "$cache/src" ]] || return 0
    find "$cache/src" -mindepth 3 -maxdepth 3 -path '*/subprojects/libvfio-user' -type d | head -n1
}

lvu_revision_of() {
    awk -F' *= *' '$1 == "revision" {print $2}' "$(dirname "$1")/libvfio-user.wrap"
}

# Download Debian's qemu source package and extract libvfio-user from it.
download_lvu_source() {
    local src_dir=$cache/src tarball="" version top
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
    top=$(tar -tf "$tarball" | sed -n '1s,/.*,,p')
    rm -rf "${src_dir:?}/$top"
    tar -xf "$tarball" -C "$src_dir" "$top/subprojects/libvfio-user" "$top/subprojects/libvfio-user.wrap" \
        "$top/docs/interop/vfio-user.rst" ||
        fail "$tarball carries no subprojects/libvfio-user"
}

# A fresh copy of the pristine source with every patch applied, in order.
# Each patch is tried first, so one that does not apply changes nothing and
# is named.
prepare_patched_source() {
    local pristine=$1 patch log=$cache/libvfio-user-patch.log
    rm -rf "$lvu_patched"
    mkdir -p "$(dirname "$lvu_patched")"
    cp -a "$pristine" "$lvu_patched"
    : >"$log"
    for patch in $(lvu_patches); do
        say "applying $(basename "$patch")"
        { patch -p1 --dry-run --batch --fuzz=0 -d "$lvu_patched" <"$patch" &&
            patch -p1 --batch --fuzz=0 --no-backup-if-mismatch -d "$lvu_patched" <"$patch"; } >>"$log" 2>&1 ||
            fail "libvfio-user patch $(basename "$patch") does not apply (see $log); fix or remove it in $lvu_patches_dir"
    done
}

# Build source $1 in folder $3 (ninja target $4, empty for all) with meson
# options $5...; the library goes to $2/lib, the log to $2-build.log.
build_lvu() {
    local src=$1 out=$2 build=$3 target=$4 log=$2-build.log
    shift 4
    rm -rf "$build" "$out"
    meson setup "$build" "$src" "$@" >"$log" 2>&1 && ninja -C "$build" $target >>"$log" 2>&1 ||
        fail "libvfio-user build failed; see $log"
    mkdir -p "$out/lib"
    cp -a "$build"/lib/libvfio-user.so* "$out/lib/"
    rm -rf "$out/lib"/*.p
}

provision_libvfio_user() {
    local pristine revision
    pristine=$(lvu_pristine)
    if [[ -n "$pristine" ]] && lvu_build_current "$lvu_out" "$(lvu_revision_of "$pristine")" &&
        lvu_build_current "$lvu_debug_out" "$(lvu_revision_of "$pristine")" &&
        [[ -f "$lvu_unpatched_out/lib/libvfio-user.so.0" ]]; then
        return
    fi
    if [[ -z "$pristine" ]]; then
        download_lvu_source
        pristine=$(lvu_pristine)
    fi
    revision=$(lvu_revision_of "$pristine")
    [[ -n "$revision" ]] || fail "no revision in $(dirname "$pristine")/libvfio-user.wrap"
    local ok=0 r
    for r in "${supported_lvu_revisions[@]}"; do [[ "$r" == "$revision" ]] && ok=1; done
    ((ok)) || fail "libvfio-user revision $revision is not one vdev's bindings support (${supported_lvu_revisions[*]})"

    prepare_patched_source "$pristine"
    say "building libvfio-user $revision with $(lvu_patches | wc -l) patch(es)"
    build_lvu "$lvu_patched" "$lvu_out" "$cache/build/libvfio-user" "" --buildtype=release -Ddebug-logs=disabled
    mkdir -p "$lvu_out/samples" "$lvu_out/include"
    cp -a "$cache/build/libvfio-user/samples/"{gpio-pci-idio-16,server,client} "$lvu_out/samples/"
    cp -a "$lvu_patched/include/." "$lvu_out/include/"
    cp "$(dirname "$(dirname "$pristine")")/docs/interop/vfio-user.rst" "$lvu_out/vfio-user.rst"

    # A second build for `make test-debug`, from the same patched source:
    # libvfio-user's own debug checks and AddressSanitizer, so memory errors in
    # the C layer surface under the suite.
    say "building libvfio-user $revision (debug, AddressSanitizer)"
    build_lvu "$lvu_patched" "$lvu_debug_out" "$cache/build/libvfio-user-debug" lib/libvfio-user.so.0.0.1 --buildtype=debug -Ddebug-logs=enabled \
        -Db_sanitize=address

    # And the revision as it comes, without vdev's patches: what a user's own
    # build is like.  The suite checks that vdev still serves with it and that
    # what needs a patch says so.
    say "building libvfio-user $revision (release, unpatched)"
    build_lvu "$pristine" "$lvu_unpatched_out" "$cache/build/libvfio-user-unpatched" lib/libvfio-user.so.0.0.1 \
        --buildtype=release -Ddebug-logs=disabled

    local out
    for out in "$lvu_out" "$lvu_debug_out" "$lvu_unpatched_out"; do
        printf '%s\n' "$revision" >"$out/REVISION"
    done
    lvu_patch_record >"$lvu_out/PATCHES"
    lvu_patch_record >"$lvu_debug_out/PATCHES"
    stamp_set libvfio-user "$revision"
}

ensure_host_packages
setup_private_apt
provision_qemu
provision_libvfio_user
# vdev's serving loop (C, vdev/libvfio_user/serve_loop.c): built here so that a compiler
# problem shows now, not in the first server; a process finds this build by the source's hash.
serving_loop=$(VDEV_DEPS_DIR="$cache" "$repo_root/.venv/bin/python" -m vdev.libvfio_user.serve_loop) || fail "cannot build vdev's serving loop (above)"
say "serving loop: $serving_loop"
say "ready: QEMU $(cat "$cache/qemu.version"), libvfio-user $(cat "$lvu_out/REVISION")" \
    "+ $(($(wc -l <"$lvu_out/PATCHES") - 1)) patch(es)"
