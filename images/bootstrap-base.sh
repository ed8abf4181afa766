#!/usr/bin/env bash
# Build Forge's Debian bookworm base image locally with debootstrap, so no
# container registry is ever needed.   Usage: bootstrap-base.sh [--force] [TAG]
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

TAG=forge-base:bookworm
FORCE=0
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-venv pulls in the bundled pip/setuptools wheels, so `python3 -m
# venv` + `pip install` work with no further downloads besides the packages.
INCLUDE=python3,python3-venv,python3-pip,ca-certificates
HOST_CA=/etc/ssl/certs/ca-certificates.crt
CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/forge/debootstrap
CACHE_MAX_DAYS=7   # older package tarballs are refetched to pick up updates

log() { echo "bootstrap-base: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,4s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) die "unknown option: $arg" ;;
    *) TAG=$arg ;;
  esac
done

"$(dirname "$0")/../scripts/ensure-docker.sh"

if [ "$FORCE" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "image $TAG already exists (use --force to rebuild)"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap via apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/forge-base.XXXXXX")
rootfs=$work/rootfs

# A failed debootstrap can leave /proc, /sys or a bind-mounted host /dev
# inside the target: unmount those first and never cross filesystems, so the
# rm can't reach into the host.
wipe() {
  awk -v d="$1/" 'index($2 "/", d) == 1 {print $2}' /proc/mounts | sort -r |
    xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$1"
}
trap 'wipe "$work"' EXIT
trap 'exit 130' INT TERM   # run the EXIT trap when killed too (debootstrap itself rides out Ctrl-C)

opts=(--variant=minbase --include="$INCLUDE")
start=$SECONDS

# Cache the downloaded .debs (keyed on everything that changes the package
# set) so a rebuild after `docker rmi` skips the download phase.
arch=$(dpkg --print-architecture)
key=$(printf '%s|' "$SUITE" "$arch" "$MIRROR" "$INCLUDE" | sha256sum | cut -c1-12)
tarball=$CACHE_DIR/$SUITE-$arch-minbase-$key.tgz
if [ -z "$(find "$tarball" -mtime -"$CACHE_MAX_DAYS" 2>/dev/null)" ]; then
  log "downloading $SUITE packages from $MIRROR"
  mkdir -p "$CACHE_DIR"
  debootstrap "${opts[@]}" --make-tarball="$work/debs.tgz" \
    "$SUITE" "$work/dl" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap download failed"; }
  mv "$work/debs.tgz" "$tarball"
fi
log "bootstrapping $SUITE into $rootfs (cache: $tarball)"
if ! debootstrap "${opts[@]}" --unpack-tarball="$tarball" \
     "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
  # A broken/incompatible cache must not wedge builds: drop it and go direct.
  log "install from cached tarball failed; retrying straight from the mirror"
  rm -f "$tarball"
  wipe "$rootfs"
  debootstrap "${opts[@]}" "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
fi

# Trust every CA the host trusts (e.g. a TLS-intercepting proxy): certs the
# image's bundle lacks become local CAs, so update-ca-certificates in derived
# images keeps them.
bundle=/etc/ssl/certs/ca-certificates.crt
if [ -r "$HOST_CA" ]; then
  awk -v out="$rootfs/usr/local/share/ca-certificates" '
    /-----BEGIN CERTIFICATE-----/ { c = "" }
    { c = c $0 "\n" }
    /-----END CERTIFICATE-----/ {
      if (FILENAME == ARGV[1]) seen[c] = 1
      else if (!(c in seen)) {
        f = sprintf("%s/forge-host-%03d.crt", out, ++n); printf "%s", c > f; close(f)
      }
    }' "$rootfs$bundle" "$HOST_CA"
  # (its stderr only carries a harmless openssl rehash warning about the bundle)
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 ||
    die "update-ca-certificates failed in the rootfs"
fi

# Keep the image small (docs/translations are ~45 MB of a ~200 MB rootfs;
# the dpkg excludes keep derived images lean too) and free of host leftovers.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/forge-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
find "$rootfs"/usr/share/doc -type f ! -name copyright -delete
find "$rootfs"/usr/share/doc -mindepth 1 -type d -empty -delete
find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* \
  "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/*.log \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
: >"$rootfs/etc/resolv.conf"   # docker provides its own at run time
log "rootfs ready after $((SECONDS - start))s ($(du -sh --one-file-system "$rootfs" | cut -f1)); importing as $TAG"

old_id=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "ENV SSL_CERT_FILE=$bundle" \
  --change "ENV REQUESTS_CA_BUNDLE=$bundle" \
  --change "ENV PIP_CERT=$bundle" \
  --change 'LABEL dev.forge.base=local-debootstrap' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap $SUITE minbase from $MIRROR" - "$TAG" >/dev/null
log "built $TAG in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$TAG" | numfmt --to=iec))"
# --force would otherwise leave the previous build behind as a dangling image
# (rmi refuses, harmlessly, while containers still use it).
if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect -f '{{.Id}}' "$TAG")" ]; then
  docker rmi "$old_id" >/dev/null 2>&1 || true
fi
