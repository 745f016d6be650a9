#!/usr/bin/env bash
# Build masqued_<version>_<arch>.deb with dh-virtualenv (docs/architecture.md, "Packaging").
#
#   packaging/build-deb.sh [--version V] [--out DIR]
#
# The source tree is copied to a fresh build/deb.XXXXXX/masqued-V/ with packaging/debian as
# debian/; debian/changelog is written there from the version, so the package
# version and `masqued --version` always agree. --version V (a PEP 440 version
# that is also a Debian one, e.g. 0.1.0+build2) sets both in the copy only.
# Output: DIR/masqued_V_ARCH.deb and a copy DIR/masqued.deb (DIR defaults to dist/),
# the versioned path on stdout. The package does not depend on where the tree is:
# packaging/normalize-venv.py removes the build path from the venv, and the
# changelog's date is the last commit's (or $SOURCE_DATE_EPOCH).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

version=""
out="$repo/dist"
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "usage: $0 [--version V] [--out DIR]" >&2; exit 2 ;;
    esac
done
upstream=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
version=${version:-$upstream}
if ! [[ $version =~ ^[0-9][0-9A-Za-z.+]*$ ]]; then
    echo "build-deb: $version is not usable as both a Debian and a PEP 440 version" >&2
    exit 2
fi

# A private work directory: parallel builds (e.g. two test runs) must not collide.
mkdir -p "$repo/build" "$out"
work=$(mktemp -d "$repo/build/deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src="$work/masqued-$version"
mkdir -p "$src"
# Only what the package is built from: no venvs, caches or earlier builds.
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*/__pycache__' --exclude=./.pytest_cache --exclude=./.mypy_cache \
    --exclude=./.ruff_cache --exclude=./.hypothesis --exclude=./bench/results \
    -cf - . | tar -C "$src" -xf -
rm -rf "$src/debian"
cp -a packaging/debian "$src/debian"
if [ "$version" != "$upstream" ]; then
    sed -i "s/^version = \".*\"$/version = \"$version\"/" "$src/pyproject.toml"
    sed -i "s/^__version__ = \".*\"$/__version__ = \"$version\"/" "$src/masqued/__init__.py"
fi
date=$(date -u -R -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")
cat > "$src/debian/changelog" <<CHANGELOG
masqued ($version) bookworm; urgency=medium

  * Release $version.

 -- masqued developers <masqued@lists.masqued.invalid>  $date
CHANGELOG

(cd "$src" && dpkg-buildpackage -us -uc -b) >&2
arch=$(dpkg --print-architecture)
deb="masqued_${version}_${arch}.deb"
mv -f "$work/$deb" "$out/$deb"
# The name the README's `apt install ./masqued.deb` uses (a copy: no link to dangle).
cp -f "$out/$deb" "$out/masqued.deb.tmp" && mv -f "$out/masqued.deb.tmp" "$out/masqued.deb"
echo "$out/$deb"
