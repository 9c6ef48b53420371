#!/usr/bin/env bash
# Build the artefacts a vdev guest test boots: Debian kernels, an uncompressed
# vmlinux of each, and an initramfs per kernel with busybox, the vfio modules,
# /init and the static guest programs from guest/; and the kernel's own vfio
# selftests, built from the source of the newest kernel of the run.
#
# Usage: tools/guest.sh [KERNEL...]        (make guest KERNELS="bookworm trixie")
#   KERNEL names a set: a Debian suite whose linux-image-amd64 to use, at the
#   version tools/guest/kernels.pin gives it:
#     bookworm, bookworm-security  the host's own apt (6.1)     - the default
#     trixie                       the private apt of `make deps` (6.12)
#     trixie-backports | sid       the private apt (newest kernels)
#
# Everything lands in .deps/guest/ (or $VDEV_DEPS_DIR/guest):
#   <kernel>/root/               the unpacked kernel packages
#   <kernel>/bzImage             the kernel as Debian ships it
#   <kernel>/vmlinux             the ELF inside it, booted through PVH (faster)
#   <kernel>/initramfs.cpio.gz   busybox, modules, /init, guest programs
#   <kernel>/kernel.json         what was built from which package version
#   programs/                    the guest programs, compiled with gcc -static
#   busybox/                     Debian's busybox-static, unpacked
#   kselftest/bin/               the vfio selftests, static (when a 7.x kernel is built)
#   kselftest/manifest.json      which linux-source they came from
#
# Each step leaves a stamp: downloads happen once per kernel (delete
# .deps/guest/<kernel> to fetch a newer one); the initramfs is rebuilt when
# anything in guest/ or this tooling changes.  A second run takes seconds.
set -euo pipefail

log_prefix=guest
# shellcheck source=tools/common.sh
source "$(dirname "$0")/common.sh"

repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache=${VDEV_DEPS_DIR:-$repo_root/.deps}
guest=$cache/guest
sources=$repo_root/guest
tools=$repo_root/tools/guest
apt_conf=$cache/apt/apt.conf
host_packages=(gcc libc6-dev zstd python3 make xz-utils uuid-dev)

stamp_ok() { [[ -f "$1" ]] && [[ "$(cat "$1")" == "$2" ]]; }
human() { numfmt --to=iec --suffix=B "$1" 2>/dev/null || printf '%s bytes' "$1"; }

# --- host tools ----------------------------------------------------------------

# --- apt: the host's for bookworm, the private one of `make deps` otherwise -----
# Run apt for kernel $1: host_apt or private_apt.
apt_for() {
    if [[ "$1" == bookworm* ]]; then
        printf 'host\n'
    else
        printf 'private\n'
    fi
}

run_apt() {
    local which=$1
    shift
    if [[ "$which" == private ]]; then
        [[ -f "$apt_conf" ]] ||
            fail "the private apt configuration $apt_conf is missing; run \`make deps\` first"
        APT_CONFIG=$apt_conf "$@"
    else
        "$@"
    fi
}

# The version of linux-image-amd64 that suite $2 offers through apt $1.
meta_version() {
    local which=$1 suite=$2
    if [[ "$which" == host ]]; then
        run_apt host apt-cache policy linux-image-amd64 | awk '/Candidate:/ {print $2; exit}' | grep -v '(none)' || true
    else
        run_apt private apt-cache madison linux-image-amd64 |
            awk -v s="$suite/main" '$0 ~ " "s" " {print $3; exit}'
    fi
}

# Names of the packages in `Depends:` of package=version $2 (apt $1).
depends_of() {
    run_apt "$1" apt-cache show "$2" | awk -F': ' '/^Depends:/ {print $2; exit}' |
        tr ',|' '\n\n' | awk '{print $1}'
}

# Refresh the lists of apt $1 (once per run): a mirror drops old versions.
update_lists() {
    # A marker file, not a variable: callers may run in subshells.
    local marker=$guest/.lists-updated-$1-$$
    [[ -e "$marker" ]] && return 1
    touch "$marker"
    trap 'rm -f "$guest"/.lists-updated-*-'$$ EXIT
    say "updating the $1 apt lists"
    run_apt "$1" apt-get update -qq >/dev/null 2>&1 || true
}

# apt-get download (apt $1) of the rest of the arguments into the current directory.
try_download() {
    local which=$1
    shift
    run_apt "$which" apt-get download -q -o APT::Sandbox::User=root "$@" >download.log 2>&1
}

# As try_download, but on failure the lists are updated once and the download retried.
download() {
    try_download "$@" && return
    update_lists "$1" && try_download "$@" && return
    fail "could not download ${*:2} (apt-get download; log: $(pwd)/download.log)"
}

# linux-image-amd64's version in suite $2 (apt $1), updating stale lists once.
# The version kernel set $1 is pinned to in tools/guest/kernels.pin (none with VDEV_GUEST_UNPINNED=1).
pinned_version() {
    [[ -n "${VDEV_GUEST_UNPINNED:-}" ]] && return 0
    awk -v n="$1" '$1 == n {print $2}' "$tools/kernels.pin"
}

# Whether apt $1 offers linux-image-amd64 at version $2.
offered() {
    run_apt "$1" apt-cache madison linux-image-amd64 | awk '{print $3}' | grep -qFx "$2"
}

# The linux-image-amd64 version to provision for set $3: its pin, else the newest suite $2 offers.
resolve_meta() {
    local which=$1 suite=$2 name=$3 meta pin
    pin=$(pinned_version "$name")
    if [[ -n "$pin" ]]; then
        offered "$which" "$pin" || { update_lists "$which" && offered "$which" "$pin"; } ||
            fail "$name is pinned to linux-image-amd64 $pin in tools/guest/kernels.pin, which apt does not offer" \
                "(it has: $(run_apt "$which" apt-cache madison linux-image-amd64 | awk '{printf "%s ", $3}'))"
        printf '%s\n' "$pin"
        return
    fi
    meta=$(meta_version "$which" "$suite")
    if [[ -z "$meta" ]] && update_lists "$which"; then
        meta=$(meta_version "$which" "$suite")
    fi
    if [[ -z "$meta" && "$which" == host ]]; then
        fail "the host's apt offers no linux-image-amd64 (for bookworm)"
    fi
    [[ -n "$meta" ]] || fail "no linux-image-amd64 in suite $suite of the private apt lists" \
        "(they have: $(awk '$1 == "deb" {printf "%s ", $4}' "$cache/apt/etc/sources.list" 2>/dev/null)-" \
        "bookworm comes from the host's apt)"
    printf '%s\n' "$meta"
}

# The packages holding kernel linux-image-amd64=$2 (apt $1), as name=version.
kernel_packages() {
    local which=$1 meta=$2 suite=$3 abi flavour pkg packages
    abi=$(depends_of "$which" "linux-image-amd64=$meta" | grep -E '^linux-image-[0-9]' | head -n1)
    [[ -n "$abi" ]] || fail "linux-image-amd64=$meta ($suite) depends on no linux-image-<version> package"
    packages="$abi=$meta"
    # Since 6.13 Debian splits the image into -binary, -modules and -base.
    flavour=${abi#linux-image-}
    for pkg in $(depends_of "$which" "$abi=$meta" |
        grep -Fx -e "linux-binary-$flavour" -e "linux-modules-$flavour" -e "linux-base-$flavour" || true); do
        packages+=" $pkg=$meta"
    done
    printf '%s\n' "$packages"
}

# --- busybox -------------------------------------------------------------------
busybox=$guest/busybox/bin/busybox

provision_busybox() {
    [[ -x "$busybox" ]] && stamp_ok "$guest/busybox/stamp" done && return
    say "downloading busybox-static"
    rm -rf "$guest/busybox"
    mkdir -p "$guest/busybox/debs"
    (cd "$guest/busybox/debs" && download host busybox-static)
    dpkg-deb -x "$guest/busybox/debs"/busybox-static_*.deb "$guest/busybox/root"
    mkdir -p "$guest/busybox/bin"
    cp "$guest/busybox/root/bin/busybox" "$busybox"
    rm -rf "$guest/busybox/debs" "$guest/busybox/root"
    "$busybox" true || fail "the downloaded busybox does not run"
    printf 'done\n' >"$guest/busybox/stamp"
}

# --- guest programs ------------------------------------------------------------
# guest/NAME.c, or every .c file in guest/NAME/, becomes programs/NAME.
cflags=(-static -O2 -Wall -Wextra -Werror=implicit-function-declaration)

build_programs() {
    mkdir -p "$guest/programs"
    local src name files digest
    for src in "$sources"/*.c "$sources"/*/; do
        [[ -e "$src" ]] || continue
        if [[ -d "$src" ]]; then
            name=$(basename "$src")
            [[ "$name" == bin ]] && continue
            files=("$src"*.c)
            [[ -e "${files[0]}" ]] || continue
        else
            name=$(basename "$src" .c)
            files=("$src")
        fi
        digest=$({
            cat "${files[@]}"
            find "$sources" -maxdepth 1 -name '*.h' -exec cat {} +
            printf '%s' "${cflags[*]}"
        } | sha256sum | cut -d' ' -f1)
        if [[ -x "$guest/programs/$name" ]] && stamp_ok "$guest/programs/.$name.stamp" "$digest"; then
            continue
        fi
        say "compiling guest program $name"
        gcc "${cflags[@]}" -I"$sources" -o "$guest/programs/$name" "${files[@]}" ||
            fail "could not compile guest program $name from ${files[*]}"
        printf '%s\n' "$digest" >"$guest/programs/.$name.stamp"
    done
    # Programs whose source is gone leave the initramfs too.
    for src in "$guest/programs"/*; do
        name=$(basename "$src")
        [[ -e "$src" ]] && ! [[ -e "$sources/$name.c" || -d "$sources/$name" ]] &&
            rm -f "$src" "$guest/programs/.$name.stamp"
    done
    return 0
}

# --- one kernel ----------------------------------------------------------------
provision_kernel() {
    local name=$1 suite=$1 which dir
    [[ "$name" == backports ]] && suite=trixie-backports
    which=$(apt_for "$suite")
    dir=$guest/$name
    mkdir -p "$dir/stamps"

    local meta
    meta=$(resolve_meta "$which" "$suite" "$name")
    if ! [[ -f "$dir/bzImage" && -f "$dir/release" ]] || ! stamp_ok "$dir/stamps/kernel" "$meta"; then
        local packages=() deb
        packages=($(kernel_packages "$which" "$meta" "$suite"))
        ((${#packages[@]})) || exit 1 # kernel_packages said why
        say "$name: downloading ${packages[*]}"
        rm -rf "$dir/debs" "$dir/root" "$dir/root.tmp"
        mkdir -p "$dir/debs" "$dir/root.tmp"
        local started=$SECONDS
        if ! (cd "$dir/debs" && try_download "$which" "${packages[@]}"); then
            # The lists may name versions the mirror has dropped: refresh, resolve again.
            update_lists "$which" || true
            meta=$(resolve_meta "$which" "$suite" "$name")
            packages=($(kernel_packages "$which" "$meta" "$suite"))
            (cd "$dir/debs" && try_download "$which" "${packages[@]}") ||
                fail "could not download ${packages[*]} (apt-get download; log: $dir/debs/download.log)"
        fi
        local size
        size=$(cat "$dir/debs"/*.deb | wc -c)
        say "$name: downloaded $(human "$size") in $((SECONDS - started)) s; unpacking"
        for deb in "$dir/debs"/*.deb; do
            dpkg-deb -x "$deb" "$dir/root.tmp" || fail "could not unpack $deb"
        done
        mv "$dir/root.tmp" "$dir/root"
        rm -rf "$dir/debs"
        local image
        image=$( (find "$dir/root/boot" "$dir/root/usr/lib/modules" -maxdepth 2 -name 'vmlinuz*' 2>/dev/null || true) | head -n1)
        [[ -n "$image" ]] || fail "no vmlinuz in ${packages[*]}"
        cp "$image" "$dir/bzImage"
        basename "$( (find "$dir/root/lib/modules" "$dir/root/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null || true) | head -n1)" >"$dir/release"
        [[ -s "$dir/release" ]] || fail "no /lib/modules/<release> in ${packages[*]}"
        printf '%s\n' "$meta" >"$dir/version"
        printf '%s\n' "${packages[0]%%=*}" >"$dir/package"
        printf '%s\n' "$size" >"$dir/download-bytes"
        rm -f "$dir/stamps"/*
        printf '%s\n' "$meta" >"$dir/stamps/kernel"
    fi

    local release version
    release=$(cat "$dir/release")
    version=$(cat "$dir/version")

    if ! [[ -f "$dir/stamps/vmlinux" ]]; then
        if summary=$(python3 "$tools/artefacts.py" vmlinux "$dir/bzImage" "$dir/vmlinux" 2>"$dir/vmlinux.err"); then
            say "$name: vmlinux: $summary"
            rm -f "$dir/vmlinux.err"
        else
            say "$name: no vmlinux, guests boot the bzImage: $(cat "$dir/vmlinux.err")"
            rm -f "$dir/vmlinux"
        fi
        printf 'done\n' >"$dir/stamps/vmlinux"
    fi

    local digest
    digest=$(
        {
            printf '%s\n' "$release" "${cflags[*]}"
            find "$sources" "$tools" "$guest/programs" -type f ! -name '.*' -print0 | sort -z | xargs -0 sha256sum
            sha256sum "$busybox" "$repo_root/tools/guest.sh"
        } | sha256sum | cut -d' ' -f1
    )
    if ! [[ -f "$dir/initramfs.cpio.gz" ]] || ! stamp_ok "$dir/stamps/initramfs" "$digest"; then
        build_initramfs "$name" "$dir" "$release"
        printf '%s\n' "$digest" >"$dir/stamps/initramfs"
    fi

    local kernel=bzImage package
    [[ -f "$dir/vmlinux" ]] && kernel=vmlinux
    package=$(cat "$dir/package" 2>/dev/null || printf 'linux-image-%s' "$release")
    printf '{"name": "%s", "suite": "%s", "package": "%s", "package_version": "%s", "release": "%s", "kernel": "%s", "modules": [%s]}\n' \
        "$name" "$suite" "$package" "$version" "$release" "$kernel" \
        "$(sed 's/\.ko$//; s/.*/"&"/' "$dir/modules.order" | paste -sd, | sed 's/,/, /g')" >"$dir/kernel.json"
    say "$name: ready: linux $release ($version), $kernel + initramfs $(human "$(stat -c %s "$dir/initramfs.cpio.gz")")"
}

build_initramfs() {
    local name=$1 dir=$2 release=$3
    say "$name: building initramfs"
    python3 "$tools/artefacts.py" initramfs --root "$dir/root" --release "$release" --list "$sources/modules" \
        --busybox "$busybox" --init "$sources/init" --scripts "$sources/bin" --programs "$guest/programs" \
        --out "$dir/initramfs.cpio.gz" --load-order "$dir/modules.order" >"$dir/modules.log" ||
        fail "could not build the initramfs for $name (see the message above)"
    say "$name: modules: $(tail -n1 "$dir/modules.log")"
    grep '^  module' "$dir/modules.log" | sed "s/^  /guest: $name: /" >&2 || true
}

# --- the kernel's vfio selftests ---------------------------------------------------
# tools/testing/selftests/vfio of Debian's linux-source for the newest kernel of
# the run (7.x: 7.2 and 7.3 carry them), built statically as the kernel's own
# Makefile builds them.  The guest gets them per run (vdev.kselftest adds them to
# the initramfs it boots), not in every initramfs: only those runs pay for them,
# and rebuilding either never rebuilds the other.
#
# Choices:
#   * Only the directories the build reads are unpacked from the 1.6 GB source
#     tree (xz decompresses the whole stream anyway: that is most of the cost).
#   * The UAPI headers come from linux-libc-dev of the same version, which is
#     Debian's `make headers` of that source, instead of running it here.
#   * tools/guest/kselftest_iommu_mode.c is linked into every program (LDLIBS):
#     it selects the library's IOMMU mode from $VDEV_IOMMU_MODE, since Debian's
#     kernels have no iommufd, the library's default.  No selftest source changes.
kselftest_programs=(vfio_pci_device_test vfio_dma_mapping_test vfio_dma_mapping_mmio_test vfio_pci_driver_test)
kselftest_members=(
    tools/testing/selftests/lib.mk tools/testing/selftests/kselftest.h
    tools/testing/selftests/kselftest_harness.h tools/testing/selftests/kselftest
    tools/testing/selftests/vfio tools/include tools/arch/x86/include scripts/subarch.include
    include/linux/pci_ids.h drivers/dma/ioat drivers/dma/idxd drivers/net/ethernet/intel/igb
)

provision_kselftests() {
    local name newest="" release newest_release=""
    for name in "$@"; do
        release=$(cat "$guest/$name/release")
        if [[ -z "$newest" || "$(printf '%s\n%s\n' "$newest_release" "$release" | sort -V | tail -n1)" == "$release" ]]; then
            newest=$name newest_release=$release
        fi
    done
    local upstream=${newest_release%%[+-]*}
    if ((${upstream%%.*} < 7)); then
        [[ -f "$guest/kselftest/manifest.json" ]] ||
            say "vfio selftests: not built (they come from a 7.x kernel's source: make guest KERNELS=trixie-backports)"
        return
    fi
    local series version which out=$guest/kselftest digest program
    series=$(cut -d. -f1,2 <<<"$upstream")
    version=$(cat "$guest/$newest/version")
    which=$(apt_for "$newest")
    digest=$({
        printf '%s\n' "linux-source-$series=$version" "${kselftest_programs[*]}" "${kselftest_members[*]}"
        cat "$tools/kselftest_iommu_mode.c"
    } | sha256sum | cut -d' ' -f1)
    if stamp_ok "$out/stamp" "$digest" && [[ -x "$out/bin/${kselftest_programs[-1]}" ]]; then
        return
    fi
    say "vfio selftests: building from linux-source-$series $version"
    local started=$SECONDS work=$out.tmp
    rm -rf "$work" "$out"
    mkdir -p "$work/debs" "$work/src" "$work/build" "$work/bin"
    (cd "$work/debs" && download "$which" "linux-source-$series=$version" "linux-libc-dev=$version")
    local top=linux-source-$series members=() member
    for member in "${kselftest_members[@]}"; do members+=("$top/$member"); done
    dpkg-deb --fsys-tarfile "$work/debs"/linux-source-"$series"_*.deb | tar -xO "./usr/src/$top.tar.xz" |
        xz -T0 -dc | tar -x -C "$work/src" -f - "${members[@]}" ||
        fail "could not unpack tools/testing/selftests/vfio from linux-source-$series $version"
    dpkg-deb -x "$work/debs"/linux-libc-dev_*.deb "$work/headers" || fail "could not unpack linux-libc-dev $version"
    rm -rf "$work/debs"
    local headers=$work/headers/usr/include targets=()
    for program in "${kselftest_programs[@]}"; do targets+=("$work/build/$program"); done
    gcc -c -O2 -Wall -Werror -o "$work/build/kselftest_iommu_mode.o" "$tools/kselftest_iommu_mode.c" ||
        fail "could not compile $tools/kselftest_iommu_mode.c"
    make -C "$work/src/$top/tools/testing/selftests/vfio" -j2 OUTPUT="$work/build" \
        KHDR_INCLUDES="-isystem $headers -isystem $headers/x86_64-linux-gnu" EXTRA_CFLAGS=-static \
        LDLIBS="-luuid $work/build/kselftest_iommu_mode.o" "${targets[@]}" >"$work/build.log" 2>&1 ||
        fail "the vfio selftests did not build; see $work/build.log"
    cp "${targets[@]}" "$work/bin/"
    local seconds=$((SECONDS - started))
    printf '{"source_package": "linux-source-%s", "source_version": "%s", "headers_package": "linux-libc-dev", "kernel": "%s", "release": "%s", "programs": [%s], "iommu_mode_variable": "VDEV_IOMMU_MODE", "build_seconds": %d}\n' \
        "$series" "$version" "$newest" "$newest_release" \
        "$(printf '"%s", ' "${kselftest_programs[@]}" | sed 's/, $//')" "$seconds" >"$work/manifest.json"
    rm -rf "$work/src" "$work/headers" "$work/build"
    mv "$work" "$out"
    printf '%s\n' "$digest" >"$out/stamp"
    say "vfio selftests: ready in $seconds s: ${kselftest_programs[*]} ($(human "$(cat "$out"/bin/* | wc -c)"))"
}

# --- main ------------------------------------------------------------------------
kernels=("$@")
# The suite's sets: bookworm (the stock module the controls and most evidence are about) and
# bookworm-security (Debian 6.1.192-2, whose fork ordering tests/guest/test_mse_fault.py asserts).
((${#kernels[@]})) || kernels=(bookworm bookworm-security)
ensure_host_packages
mkdir -p "$guest"
provision_busybox
build_programs
for kernel in "${kernels[@]}"; do
    provision_kernel "$kernel"
done
provision_kselftests "${kernels[@]}"
