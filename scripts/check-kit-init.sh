#!/usr/bin/env bash
# Checks that the guest /init inlined in scripts/guest-kit.sh is exactly
# guest/init. Exits 1 and shows the difference if not.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! diff -u guest/init <(bash scripts/guest-kit.sh --print-init) >&2; then
	echo "check-kit-init: scripts/guest-kit.sh does not carry guest/init verbatim: copy guest/init into its kit_builtin_init heredoc" >&2
	exit 1
fi
echo "check-kit-init: ok"
