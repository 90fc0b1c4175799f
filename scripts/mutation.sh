#!/usr/bin/env bash
# Mutation testing of one module with the tests that should guard it (mutmut 3). Not part of CI: slow.
#
#   bash scripts/mutation.sh models/quantizer.py tests/test_meditok.py tests/test_tokenizer_losses.py
#
# mutmut changes the module one small edit at a time (an operator, a constant, an argument dropped: a
# "mutant") and reruns those of the given tests that reach the changed function. A mutant no test notices
# ("survived") is behaviour nothing checks: kill it with a test, or explain why it is equivalent.
# The run happens in a scratch copy of the tree ($MUTATION_DIR, default a new temp folder), never in the
# working tree. Needs mutmut in the venv (`pip install mutmut`, a developer tool outside requirements.txt).
# Afterwards: cd $MUTATION_DIR && mutmut results (the survivors) / mutmut show NAME (a survivor's diff).
# Environment: JOBS (parallel mutants, default 1), MUTATION_DIR, MARK (a pytest -m expression, e.g.
# MARK="not slow" to leave out the slow tests, which otherwise rerun for every mutant they reach), MUTANTS
# (mutant name globs to run only some functions of a big module, e.g. MUTANTS='models.gpt.x_condition_mask*
# models.gpt.xǁAttentionǁ*'; mutmut names methods module.xǁClassǁmethod__mutmut_N).
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,14p' "$0"
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install mutmut" >&2; exit 2; }
module=$1
shift
[ -f "$module" ] || { echo "no such module: $module" >&2; exit 2; }

work=${MUTATION_DIR:-$(mktemp -d -t "mutation-$(basename "$module" .py)-XXXX")}
mkdir -p "$work"
# The tree as it is now (tracked and untracked files, not what .gitignore excludes).
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work"

# mutmut copies the mutated module and `also_copy` into $work/mutants and runs pytest there.
also_copy=$(cd "$work" && ls -d -- */ ./*.py pytest.ini 2>/dev/null | sed 's#/$##; s#^\./##' | grep -v '^mutants$' | sed 's/^/    /')
tests=$(printf '    %s\n' "$@")
mark=""
if [ -n "${MARK:-}" ]; then
    mark=$(printf '    -m\n    %s' "$MARK")
fi
cat > "$work/setup.cfg" <<EOF
[mutmut]
source_paths = $module
also_copy =
$also_copy
pytest_add_cli_args_test_selection =
$tests
pytest_add_cli_args =
    -p no:cacheprovider
    -q
    -o
    addopts=
$mark
process_isolation = forkserver
EOF

cd "$work"
echo "mutating $module with $* in $work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086  # MUTANTS is a list of globs for mutmut, not for the shell
set -f
mutmut run --max-children "${JOBS:-1}" ${MUTANTS:-} || true
set +f
mutmut results
