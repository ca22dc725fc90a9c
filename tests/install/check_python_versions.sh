#!/usr/bin/env bash
# Builds moelb from this checkout with each Python 3.10-3.13 and smoke-tests the install: for each
# interpreter a fresh virtual environment, `pip install '.[test]'` (the C++ extension built by
# scikit-build-core in pip's isolated build environment), then a few pytest files. Prints one line
# per interpreter (version, NumPy version, install and test seconds, pytest's summary) and exits 1
# if any interpreter failed to install or test. Not run by CI (each build takes minutes); run it
# when the packaging, the build or the supported Python versions change.
#
#   tests/install/check_python_versions.sh                      # every 3.10-3.13 it finds
#   tests/install/check_python_versions.sh python3.10 /usr/bin/python3.13
#   TESTS="tests/python/test_io.py" KEEP=1 tests/install/check_python_versions.sh
#
# Interpreters are looked up as python3.X on the PATH and under pyenv's versions folder
# ($PYENV_ROOT, default ~/.pyenv). TESTS: the pytest arguments (default: the routing and EPLB tests).
# WORK: where the environments and logs go (default: a new folder under /tmp); KEEP=1 keeps it.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
root=$PWD
tests=${TESTS:-tests/python/test_routing.py tests/python/test_eplb.py}
work=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/moelb-pyversions.XXXXXX")}
mkdir -p "$work"

# The newest working interpreter of version $1 (3.X): python3.X on the PATH, else pyenv's.
find_python() {
  local want=$1 candidate
  for candidate in "$(command -v "python$want" 2>/dev/null)" \
    $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want".*/bin/python"$want" 2>/dev/null | sort -V -r); do
    [ -n "$candidate" ] || continue
    # pyenv's shims exist for versions that are not selected and then fail: run it to be sure.
    if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]
    then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ $# -gt 0 ]; then
  pythons=("$@")
else
  pythons=()
  for version in 3.10 3.11 3.12 3.13; do
    if found=$(find_python "$version"); then
      pythons+=("$found")
    else
      echo "python$version: not found, skipped"
    fi
  done
fi
[ ${#pythons[@]} -gt 0 ] || { echo "no interpreter to check" >&2; exit 1; }

echo "moelb $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'): $tests; logs in $work"
failed=0
results=()
for python in "${pythons[@]}"; do
  version=$("$python" -c 'import platform; print(platform.python_version())') || {
    results+=("$python: does not run"); failed=1; continue; }
  env_dir=$work/venv-$version
  log=$work/$version.install.log
  test_log=$work/$version.pytest.log
  rm -rf "$env_dir"
  start=$(date +%s)
  if ! { "$python" -m venv "$env_dir" &&
    "$env_dir/bin/python" -m pip install -q "$root[test]"; } >"$log" 2>&1; then
    results+=("Python $version ($python): install FAILED after $(($(date +%s) - start)) s, see $log")
    echo "${results[-1]}"
    failed=1
    continue
  fi
  installed=$(($(date +%s) - start))
  numpy=$("$env_dir/bin/python" -c 'import numpy; print(numpy.__version__)')
  start=$(date +%s)
  # Run from the work folder so that the installed moelb is imported, not the checkout's python/.
  (cd "$work" && "$env_dir/bin/python" -m pytest -q -p no:cacheprovider \
    $(for t in $tests; do echo "$root/$t"; done)) >"$test_log" 2>&1
  status=$?
  summary=$(grep -E '(passed|failed|error)' "$test_log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  verdict=ok
  [ $status -eq 0 ] || { verdict="FAILED (pytest exit $status, see $test_log)"; failed=1; }
  results+=("Python $version: numpy $numpy, install ${installed} s, tests $(($(date +%s) - start)) s: $summary: $verdict")
  echo "${results[-1]}"
done

echo "summary:"
printf '%s\n' "${results[@]}"
[ "${KEEP:-0}" = 1 ] || [ $failed -ne 0 ] || rm -rf "$work"
exit $failed
