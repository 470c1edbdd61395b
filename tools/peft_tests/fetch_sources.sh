#!/usr/bin/env bash
# Lay out PEFT's own tests for run.sh (nothing of PEFT is committed here): sources/sdist-VERSION from the sdist of
# the installed peft on PyPI, plus tests/__init__.py and tests/conftest.py, which the sdist lacks, from a bare git
# mirror of huggingface/peft (the search tool's `fetch github:huggingface/peft` gives one):
#   tools/peft_tests/fetch_sources.sh /work/.mirror/huggingface+peft/repo
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MIRROR="${1:?usage: fetch_sources.sh PEFT_GIT_MIRROR}"
VERSION="$(python3 -c 'import peft; print(peft.__version__)')"
DEST="$HERE/sources/sdist-$VERSION"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: -d "$TMP" "peft==$VERSION"
tar -xzf "$TMP"/peft-"$VERSION".tar.gz -C "$TMP"
rm -rf "$DEST" && mkdir -p "$DEST"
cp -r "$TMP/peft-$VERSION/tests" "$DEST/tests"
for f in tests/__init__.py tests/conftest.py; do
    git --git-dir="$MIRROR" show "HEAD:$f" > "$DEST/$f"
done
git --git-dir="$MIRROR" rev-parse HEAD > "$DEST/SNAPSHOT"
echo "PEFT $VERSION tests in $DEST (run.sh expects sources/sdist-0.21.2 for TESTS=sdist; adjust it for another version)"
