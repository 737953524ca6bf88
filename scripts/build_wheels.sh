#!/usr/bin/env bash
# Builds splatdd and every plugin under plugins/*/ into one wheelhouse folder (docs/install.md).
#
#   bash scripts/build_wheels.sh [WHEELHOUSE]        # default WHEELHOUSE: wheels/ in the checkout
#   bash scripts/build_wheels.sh --deps-only         # steps 1-2 only (scripts/install.sh uses it)
#   pip install --find-links WHEELHOUSE "splatdd[diffusion]"    # or "splatdd[all]", or one plugin
#
# 1. Reads build-system.requires of ./pyproject.toml and of every plugins/*/pyproject.toml (new
#    plugins are picked up automatically) and installs them (scikit-build-core, pybind11,
#    setuptools, hatchling, ...) BEFORE any --no-build-isolation step. torch is refused as a build
#    requirement: splatdd._C does not link libtorch, and pip would otherwise fetch a CUDA torch.
# 2. Checks that every build requirement is now satisfied (and that cmake is there); a missing one
#    is named and the script exits with status 2.
# 3. pip wheel --no-deps --no-build-isolation: the core, then all plugins, into WHEELHOUSE. Older
#    splatdd*.whl files in WHEELHOUSE are removed first, so the folder holds exactly this build.
#
# Environment:
#   PYTHON                   interpreter to build with (default python3)
#   SPLATDD_CUDA             AUTO (default) / ON / OFF: the core's CUDA backend, as in install.sh
#   SPLATDD_BUILD_DIR        the core's CMake build folder (default: a fresh temporary folder, so the
#                            wheel never reuses the editable install's build/)
#   SPLATDD_SKIP_BUILD_DEPS  1: do not pip install the build requirements, only check them (offline)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEPS_ONLY=""
if [ "${1:-}" = "--deps-only" ]; then DEPS_ONLY=1; shift; fi
case "${1:-}" in -*) echo "usage: build_wheels.sh [WHEELHOUSE | --deps-only]" >&2; exit 2;; esac
WHEELHOUSE=${1:-wheels}
die() { echo "build_wheels.sh: error: $*" >&2; exit 2; }

[ -f pyproject.toml ] || die "no pyproject.toml in $(pwd): run the script from a splatdd checkout"
PROJECTS=(.)
for p in plugins/*/; do
  if [ -f "$p/pyproject.toml" ]; then PROJECTS+=("${p%/}"); fi
done

# --- 1. the build requirements of every project (torch refused) ------------------------------------
REQS=$("$PY" - "${PROJECTS[@]}" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
reqs, bad = [], []
for project in sys.argv[1:]:
    path = f"{project}/pyproject.toml"
    with open(path, "rb") as f:
        data = tomllib.load(f)
    requires = data.get("build-system", {}).get("requires")
    if not requires:
        bad.append(f"{path}: [build-system] requires is missing or empty")
        continue
    for r in requires:
        name = re.split(r"[\s<>=!~;\[(]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if name == "torch":
            bad.append(f"{path}: torch must not be a build requirement (it is a runtime dependency; "
                       f"listing it makes pip fetch a CUDA build of torch)")
        elif r not in reqs:
            reqs.append(r)
if bad:
    sys.exit("build_wheels.sh: error: " + "\n  ".join(bad))
print("\n".join(reqs))
EOF
) || exit 2
mapfile -t REQ_ARRAY <<<"$REQS"
# scikit-build-core needs cmake; without one on PATH, the PyPI package provides it
if ! command -v cmake >/dev/null 2>&1 && ! "$PY" -c "import cmake" 2>/dev/null; then REQ_ARRAY+=("cmake>=3.18"); fi
echo "build_wheels.sh: projects: ${PROJECTS[*]}"
echo "build_wheels.sh: build requirements: ${REQ_ARRAY[*]}"

if [ -z "${SPLATDD_SKIP_BUILD_DEPS:-}" ]; then
  "$PY" -m pip install -q "${REQ_ARRAY[@]}" \
    || die "could not install the build requirements: ${REQ_ARRAY[*]} (pip's message above)"
fi

# --- 2. every build requirement satisfied, cmake present --------------------------------------------
"$PY" - "${REQ_ARRAY[@]}" <<'EOF' || exit 2
import importlib.metadata as md, shutil, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
missing = []
for text in sys.argv[1:]:
    req = Requirement(text)
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{text} (not installed)")
        continue
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        missing.append(f"{text} (installed: {have})")
if shutil.which("cmake") is None:
    try:
        import cmake  # noqa: F401  (the PyPI cmake package)
    except ImportError:
        missing.append("cmake>=3.18 (not on PATH: apt-get install cmake, or pip install cmake)")
if missing:
    sys.exit("build_wheels.sh: error: missing build requirements for --no-build-isolation:\n  "
             + "\n  ".join(missing)
             + f"\ninstall them with: {sys.executable} -m pip install "
             + " ".join(repr(m.split(' (')[0]) for m in missing))
EOF

[ -z "$DEPS_ONLY" ] || { echo "build_wheels.sh: build requirements satisfied"; exit 0; }

# --- 3. the wheels ------------------------------------------------------------------------------------
mkdir -p "$WHEELHOUSE"
WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
rm -f "$WHEELHOUSE"/splatdd-*.whl "$WHEELHOUSE"/splatdd_*.whl
BUILD_DIR=${SPLATDD_BUILD_DIR:-}
if [ -z "$BUILD_DIR" ]; then
  BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/splatdd-wheel-build.XXXXXX")
  trap 'rm -rf "$BUILD_DIR"' EXIT
fi
if [ -z "${SPLATDD_CUDA:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi

PIPW=("$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELHOUSE")
"${PIPW[@]}" --config-settings "build-dir=$BUILD_DIR" . || die "building the splatdd wheel failed"
if [ "${#PROJECTS[@]}" -gt 1 ]; then
  "${PIPW[@]}" "${PROJECTS[@]:1}" || die "building the plugin wheels failed: ${PROJECTS[*]:1}"
fi

N=$(find "$WHEELHOUSE" -maxdepth 1 \( -name 'splatdd-*.whl' -o -name 'splatdd_*.whl' \) | wc -l)
[ "$N" -eq "${#PROJECTS[@]}" ] || die "expected ${#PROJECTS[@]} wheels in $WHEELHOUSE, found $N"
echo "build_wheels.sh: $N wheels in $WHEELHOUSE:"
(cd "$WHEELHOUSE" && ls -1 splatdd-*.whl splatdd_*.whl)
