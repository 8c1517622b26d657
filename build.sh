#!/usr/bin/env bash
# Build the appliance image, tagged <image>:<[project] version from pyproject.toml> and <image>:latest.
#   ENGINE=docker|podman  engine to use (default: docker when installed, else podman)
#   IMAGE=name            image name (default: appliance)
# Any arguments go to `<engine> build`, e.g. ./build.sh --no-cache --platform linux/arm64
# The last line printed is the versioned tag.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

engine="${ENGINE:-}"
if [[ -z "$engine" ]]; then
    if command -v docker >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    else
        echo "build.sh: neither docker nor podman is installed (or set ENGINE)" >&2
        exit 1
    fi
fi

version="$(awk -F "[\"']" '
    /^[[:space:]]*\[/ { in_project = ($0 ~ /^[[:space:]]*\[project\][[:space:]]*$/) }
    in_project && /^[[:space:]]*version[[:space:]]*=/ { print $2; exit }
' pyproject.toml)"
if [[ -z "$version" ]]; then
    echo "build.sh: no [project] version in pyproject.toml" >&2
    exit 1
fi

image="${IMAGE:-appliance}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# podman and buildah default to the OCI image format, which drops HEALTHCHECK.
format=()
case "$(basename "$engine")" in
    podman | buildah) format=(--format docker) ;;
esac

"$engine" build \
    -f image/Dockerfile \
    -t "$image:$version" \
    -t "$image:latest" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --build-arg "CREATED=$created" \
    "${format[@]}" \
    "$@" \
    .
echo "$image:$version"
